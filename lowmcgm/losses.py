"""The MCGM loss terms, as pure functions (docs/method.md, "One training step", steps 4-7).

    total = L_rec + attn_weight * (L_attn + lambda_m * L_mask_attn) + prior_weight * L_prior
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Keeps map / max finite when a map is all zeros (it never is after a softmax, but fp16 underflows).
_MAX_EPS = 1e-8


def compute_masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """MSE of prediction and target, both multiplied by the union mask, averaged over ALL elements.

    Args:
        pred, target: (B, C, h, w) UNet output and its target (noise, or velocity for v models).
        union: (B, 1, h, w) union of the selected masks at latent size.
    """
    return F.mse_loss(pred.float() * union, target.float() * union)


def compute_attention_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Break-a-scene's cross-attention loss: each map over its max, MSE against its mask.

    Args:
        maps: (B, K, h, w) attention of each selected token, averaged over loss layers and heads.
        masks: (B, K, h, w) the concept's mask resized (nearest) to h x w.

    Returns:
        Sum over concepts of the per-map MSE, divided by the batch size.
    """
    peak = maps.flatten(-2).amax(-1)[..., None, None].clamp_min(_MAX_EPS)
    per_map = ((maps / peak - masks.float()) ** 2).mean(dim=(-2, -1))  # (B, K)
    return per_map.sum() / maps.shape[0]


@dataclass
class LossParts:
    """The terms of one step, kept apart for logging."""

    rec: torch.Tensor
    attn: torch.Tensor
    mask_attn: torch.Tensor
    prior: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


def compute_total_loss(parts: LossParts, attn_weight: float, mask_attn_weight: float,
                       prior_weight: float) -> torch.Tensor:
    return parts.rec + attn_weight * (parts.attn + mask_attn_weight * parts.mask_attn) + prior_weight * parts.prior
