"""The UNet's conditioning from prompts, per family: SD's context alone, SDXL's two encoders and pooled one."""

from __future__ import annotations

import pytest
import torch
from conftest import pooled_written_out

from lowmcgm.models.text_conditioning import (TextStates, encode_prompt_ids, encode_sdxl_text, tokenize_prompts,
                                              unet_added_kwargs)
from lowmcgm.models.tiny import build_tiny_base

PROMPTS = ["a photo of a dog", "a cat on the grass"]


def test_sd_conditions_on_the_last_hidden_states_alone():
    base = build_tiny_base("tiny")
    ids = tokenize_prompts(base, PROMPTS)
    assert ids.ids_2 is None and ids.ids.shape == (2, 77)
    text = encode_prompt_ids(base, ids, "cpu")
    assert text.pooled is None and unet_added_kwargs(text, None) is None
    torch.testing.assert_close(text.context, base.text_encoder(ids.ids)[0])


def test_sdxl_tokenizes_twice_and_encodes_as_its_pipeline():
    base = build_tiny_base("tiny-xl")
    ids = tokenize_prompts(base, PROMPTS)
    # The same tokens, padded differently: "<|endoftext|>" in the first, "!" (id 0) in the second.
    length = len(base.tokenizer(PROMPTS[0]).input_ids)
    assert torch.equal(ids.ids[0, :length], ids.ids_2[0, :length])
    assert ids.ids[0, length:].unique().tolist() == [base.tokenizer.eos_token_id]
    assert ids.ids_2[0, length:].unique().tolist() == [0]
    text = encode_prompt_ids(base, ids, "cpu")
    expected = encode_sdxl_text(base, ids.ids, ids.ids_2)
    torch.testing.assert_close(text.context, expected.context)
    torch.testing.assert_close(text.pooled, expected.pooled)
    added = unet_added_kwargs(text, torch.tensor([96.0, 128, 0, 10, 64, 64]))
    assert added["time_ids"].shape == (2, 6) and added["time_ids"][1, 1] == 128
    assert added["text_embeds"] is text.pooled


def test_text_states_split_and_stack_back():
    base = build_tiny_base("tiny-xl")
    ids = tokenize_prompts(base, PROMPTS)
    text = encode_prompt_ids(base, ids, "cpu")
    rows = text.split()
    assert len(rows) == 2 and rows[1].context.shape == (1, 77, 64) and rows[1].pooled.shape == (1, 32)
    again = TextStates.stack(rows[::-1])
    assert torch.equal(again.context[0], text.context[1]) and torch.equal(again.pooled[1], text.pooled[0])
    assert ids.key(0) != ids.key(1) and len(ids) == 2


def _handle_installed(base, handle="<asset0>"):
    """``base`` with one handle token added to both tokenizers (ids past the vocabulary, as on SDXL)."""
    for tokenizer, encoder in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
        tokenizer.add_tokens([handle])
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return base


def test_sdxl_pools_at_the_end_of_text_not_at_the_handle():
    """SDXL's text_encoder_2 config keeps the legacy eos_token_id 2, so transformers pools at the highest
    id: a handle's. The pooled embedding must be the projection at the first end-of-text token, written
    out here from the hidden states (kohya's pool_workaround; ComfyUI and A1111 pool there)."""
    base = _handle_installed(build_tiny_base("tiny-xl"))
    assert base.text_encoder_2.config.eos_token_id == 2  # the real config's quirk, carried by tiny-xl
    prompts = ["a photo of <asset0> on the beach", "<asset0>"]
    ids = tokenize_prompts(base, prompts)
    handle_id = base.tokenizer_2.convert_tokens_to_ids("<asset0>")
    assert ids.ids_2.max() == handle_id  # the highest id of each prompt is the handle's
    with torch.no_grad():
        text = encode_prompt_ids(base, ids, "cpu")
        transformers_pooled = base.text_encoder_2(ids.ids_2).text_embeds  # at the highest id: the handle
    torch.testing.assert_close(text.pooled, pooled_written_out(base.tokenizer_2, base.text_encoder_2, prompts),
                               rtol=0, atol=1e-6)
    assert not torch.allclose(text.pooled, transformers_pooled)


@pytest.mark.parametrize("name", ["tiny", "tiny-v"], ids=["SD 1.x (tiny, from sd15)", "SD 2.x (tiny-v, from sd21-768)"])
def test_sd_context_is_the_stock_pipelines(name):
    """Prompts without handles: the context is what diffusers' own SD pipeline encodes, on a model
    carrying the real config's quirks (SD 2.x pads with "!", id 0)."""
    from diffusers import StableDiffusionPipeline

    base = build_tiny_base(name)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=base.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        ours = encode_prompt_ids(base, tokenize_prompts(base, PROMPTS), "cpu")
        theirs, _ = pipe.encode_prompt(PROMPTS, torch.device("cpu"), 1, False)
    torch.testing.assert_close(ours.context, theirs, rtol=0, atol=0)
