"""SDXL's context, pooled embedding and size numbers, equal to what diffusers' SDXL pipeline builds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowmcgm.errors import UserError
from lowmcgm.models.sdxl_conditioning import sdxl_time_ids
from lowmcgm.models.text_conditioning import encode_sdxl_text
from lowmcgm.models.tiny import build_tiny_base


@pytest.fixture(scope="module")
def tiny_xl():
    return build_tiny_base("tiny-xl")


@pytest.fixture(scope="module")
def pipe(tiny_xl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=tiny_xl.vae, text_encoder=tiny_xl.text_encoder, text_encoder_2=tiny_xl.text_encoder_2,
        tokenizer=tiny_xl.tokenizer, tokenizer_2=tiny_xl.tokenizer_2, unet=tiny_xl.unet,
        scheduler=tiny_xl.noise_scheduler, add_watermarker=False)


def _ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def test_text_conditioning_is_the_pipelines(tiny_xl, pipe):
    prompts = ["a photo of a dog on the beach", "a cat"]
    with torch.no_grad():
        ours = encode_sdxl_text(tiny_xl, _ids(tiny_xl.tokenizer, prompts), _ids(tiny_xl.tokenizer_2, prompts))
        context, _, pooled, _ = pipe.encode_prompt(prompts, device=torch.device("cpu"), num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
    assert ours.context.shape == (2, 77, tiny_xl.text_width)
    torch.testing.assert_close(ours.context, context, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
    # The two tokenizers pad differently, and the second's padding reaches its hidden states.
    padded_like_first = encode_sdxl_text(tiny_xl, _ids(tiny_xl.tokenizer, prompts), _ids(tiny_xl.tokenizer, prompts))
    assert not torch.equal(padded_like_first.context, ours.context)


def test_size_numbers_are_the_pipelines(tiny_xl, pipe):
    ours = sdxl_time_ids(tiny_xl, (96, 80), (8, 0), (64, 64), batch=3)
    theirs = pipe._get_add_time_ids((96, 80), (8, 0), (64, 64), dtype=torch.float32,
                                    text_encoder_projection_dim=tiny_xl.text_encoder_2.config.projection_dim)
    assert ours.shape == (3, 6)
    torch.testing.assert_close(ours, theirs.expand(3, -1), rtol=0, atol=0)


def test_a_unet_that_does_not_take_sdxl_sizes_is_a_clear_error(tiny_xl):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(**{**tiny_xl.text_encoder_2.config.to_dict(), "projection_dim": 16})
    odd = dataclasses.replace(tiny_xl, text_encoder_2=CLIPTextModelWithProjection(config))
    with pytest.raises(UserError, match="not an SDXL base model config"):
        sdxl_time_ids(odd, (64, 64), (0, 0), (64, 64))
    with pytest.raises(ValueError, match="not an SDXL model"):
        encode_sdxl_text(build_tiny_base("tiny"), torch.zeros(1, 77, dtype=torch.long), torch.zeros(1, 77,
                                                                                                    dtype=torch.long))
