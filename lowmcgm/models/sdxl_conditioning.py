"""SDXL's conditioning, built as diffusers' ``StableDiffusionXLPipeline`` builds it.

SDXL conditions its UNet on three things where SD 1.x/2.x has one:

- the context: the penultimate hidden states of both text encoders (CLIP ViT-L, 768 wide, and
  OpenCLIP ViT-bigG, 1280), concatenated to 2048 per token; lowmcgm's mask tokens are appended
  after these 77 tokens, as after SD's;
- the pooled embedding: the second encoder's projected end-of-text embedding (``text_embeds``);
- six size numbers (``time_ids``): the photo's original size, the top-left corner of the crop taken
  from it and the target size, each (height, width), which the UNet embeds beside the pooled one.

The pipeline builds them from prompt strings (``encode_prompt``, ``_get_add_time_ids``); training
needs them from token ids that hold handle tokens, and from the crop the data pipeline actually
took. The first two come from ``text_conditioning.encode_sdxl_text`` (the text side of every
family lives there); this module builds the size numbers. tests/test_sdxl_conditioning.py holds the
results equal to the pipeline's.
"""

from __future__ import annotations

from typing import Any

import torch

from lowmcgm.errors import UserError

# SDXL's size conditioning: six numbers (original size, crop corner, target size), each embedded
# with addition_time_embed_dim sinusoids, beside the second text encoder's pooled embedding.
SDXL_TIME_IDS = 6


def sdxl_time_ids(base: Any, original_hw: tuple[int, int], crop_top_left: tuple[int, int],
                  target_hw: tuple[int, int], batch: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The six size numbers for ``batch`` images: (original h, w, crop top, left, target h, w).

    Args:
        base: a ``BaseModel`` (typed loosely: ``models.base`` imports the families that call this).
        original_hw: the photo's size before any resize or crop, in pixels.
        crop_top_left: where the crop that was kept starts in the resized photo (0, 0 for none).
        target_hw: the size the UNet works at (the training resolution, or the image size drawn).

    Raises:
        UserError: the UNet's added embedding does not take six numbers beside the pooled
            embedding (a model config that is not SDXL's), said as the pipeline would fail.
    """
    expected = base.unet.add_embedding.linear_1.in_features
    passed = base.unet.config.addition_time_embed_dim * SDXL_TIME_IDS + base.text_encoder_2.config.projection_dim
    if expected != passed:
        raise UserError(f"Base model '{base.name}' takes an added embedding of {expected} numbers, but its configs "
                        f"give {passed} (addition_time_embed_dim x 6 + text_encoder_2 projection_dim): not an "
                        "SDXL base model config.")
    row = [*original_hw, *crop_top_left, *target_hw]
    return torch.tensor([row] * batch, dtype=dtype)
