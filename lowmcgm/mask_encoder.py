"""The MCGM mask encoder: one token per concept mask, appended after the 77 text tokens.

``Linear(64*64, d_text)`` with bias, as the paper's sec. 3.2. Unlike MCGM-Styler, it is trained,
saved and reloaded, and every sample keeps its own masks (the reference maxes over the batch).

Two options put the tokens on the handles' scale (issue 12; docs/method.md, "Mask-aware training"): AdamW moves
each weight row by about lr per step whatever its gradient's size, so with a 0/1 input a token
moves by about (active pixels x lr) per step, hundreds of times a handle's step.
- ``input_mode="area_normalized"`` divides the mask by its pixel count: the input sums to 1, and
  the token moves by about lr per step, like a handle, whatever the subject's size.
- ``output_norm="layernorm"`` normalises each token and scales it by a learned gain initialised to
  the handles' text-state RMS (``init_output_scale``): the token starts on the text tokens' scale
  and only the gain, a plain vector stepped like a handle, can change that scale.
"""

from __future__ import annotations

import torch
from torch import nn

from lowmcgm.data import resize_masks

MASK_SIZE = 64  # masks are flattened at 64x64 = 4096 values, per the paper


INPUT_MODES = ("binary", "area_normalized")
OUTPUT_NORMS = ("none", "layernorm")


class MaskEncoder(nn.Module):
    """Maps (B, K, H, W) binary masks to (B, K, d_text) mask tokens.

    Args:
        text_width: d_text. mask_size: side the masks are resized to (64, per the paper).
        input_mode: 'binary' (the paper) or 'area_normalized' (mask / its pixel count).
        output_norm: 'none' (the paper) or 'layernorm' (a ``norm`` submodule after ``proj``).
    """

    def __init__(self, text_width: int, mask_size: int = MASK_SIZE, input_mode: str = "binary",
                 output_norm: str = "none"):
        super().__init__()
        if input_mode not in INPUT_MODES or output_norm not in OUTPUT_NORMS:
            raise ValueError(f"unknown mask encoder options {input_mode!r}, {output_norm!r}")
        self.mask_size = mask_size
        self.input_mode = input_mode
        self.output_norm = output_norm
        self.proj = nn.Linear(mask_size * mask_size, text_width)
        self.norm = nn.LayerNorm(text_width) if output_norm == "layernorm" else None

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        small = resize_masks(masks, self.mask_size)  # (B, K, 64, 64)
        flat = small.flatten(-2).to(self.proj.weight.dtype)  # (B, K, 4096)
        if self.input_mode == "area_normalized":
            flat = flat / flat.sum(-1, keepdim=True).clamp_min(1.0)  # a blank mask stays all zero
        tokens = self.proj(flat)
        return self.norm(tokens) if self.norm is not None else tokens

    @torch.no_grad()
    def init_output_scale(self, rms: torch.Tensor) -> None:
        """Set the LayerNorm gain to ``rms`` (a 0-d tensor: the handles' text-state RMS), so a
        fresh token's RMS is ``rms``. Nothing to do without the LayerNorm."""
        if self.norm is not None:
            self.norm.weight.copy_(rms.to(self.norm.weight).expand_as(self.norm.weight))


def compute_token_rms(tokens: torch.Tensor) -> torch.Tensor:
    """Root mean square over the last dimension, averaged over the others: (..., d) -> 0-d."""
    return tokens.detach().float().pow(2).mean(-1).sqrt().mean()


def zero_mask_tokens(batch: int, k: int, text_width: int, like: torch.Tensor) -> torch.Tensor:
    """k all-zero tokens per sample: for prior samples and the unconditional branch (paper sec. 3.2)."""
    return torch.zeros(batch, k, text_width, dtype=like.dtype, device=like.device)


def append_mask_tokens(text_states: torch.Tensor, mask_tokens: torch.Tensor | None) -> torch.Tensor:
    """(B, 77, d) text states + (B, K, d) mask tokens -> (B, 77 + K, d) context for the UNet."""
    if mask_tokens is None or mask_tokens.shape[1] == 0:
        return text_states
    return torch.cat([text_states, mask_tokens.to(text_states.dtype)], dim=1)
