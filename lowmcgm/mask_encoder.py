"""The MCGM mask encoder: one token per concept mask, appended after the 77 text tokens.

``Linear(64*64, d_text)`` with bias, as the paper's sec. 3.2. Unlike MCGM-Styler, it is trained,
saved and reloaded, and every sample keeps its own masks (the reference maxes over the batch).
"""

from __future__ import annotations

import torch
from torch import nn

from lowmcgm.data import resize_masks

MASK_SIZE = 64  # masks are flattened at 64x64 = 4096 values, per the paper


class MaskEncoder(nn.Module):
    """Maps (B, K, H, W) binary masks to (B, K, d_text) mask tokens."""

    def __init__(self, text_width: int, mask_size: int = MASK_SIZE):
        super().__init__()
        self.mask_size = mask_size
        self.proj = nn.Linear(mask_size * mask_size, text_width)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        small = resize_masks(masks, self.mask_size)  # (B, K, 64, 64)
        flat = small.flatten(-2).to(self.proj.weight.dtype)  # (B, K, 4096)
        return self.proj(flat)


def zero_mask_tokens(batch: int, k: int, text_width: int, like: torch.Tensor) -> torch.Tensor:
    """k all-zero tokens per sample: for prior samples and the unconditional branch (paper sec. 3.2)."""
    return torch.zeros(batch, k, text_width, dtype=like.dtype, device=like.device)


def append_mask_tokens(text_states: torch.Tensor, mask_tokens: torch.Tensor | None) -> torch.Tensor:
    """(B, 77, d) text states + (B, K, d) mask tokens -> (B, 77 + K, d) context for the UNet."""
    if mask_tokens is None or mask_tokens.shape[1] == 0:
        return text_states
    return torch.cat([text_states, mask_tokens.to(text_states.dtype)], dim=1)
