"""The UNet's conditioning from prompts, per family: SD's context alone, SDXL's two encoders and pooled one."""

from __future__ import annotations

import torch

from lowmcgm.models import build_tiny_base
from lowmcgm.text_conditioning import (TextStates, encode_prompt_ids, encode_sdxl_text, tokenize_prompts,
                                       unet_added_kwargs)

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
