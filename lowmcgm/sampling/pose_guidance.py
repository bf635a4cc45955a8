"""Pose guidance at sampling: pull each posed subject into its pose mask through cross-attention.

A mask token alone says what, hardly where (docs/method.md, "Why the mask alone does not set the
pose"). These training-free mechanisms act where position lives, on the cross-attention maps:

- ``attention`` (DenseDiffusion, Kim et al. ICCV 2023; Directed Diffusion, AAAI 2024): on every
  cross-attention layer, the logits of each posed handle's token, and of its mask token, get
  ``+w`` inside its pose mask and ``-w`` outside, on the conditional branch only. ``w`` starts at
  the strength and fades linearly to zero over the guided steps: the layout is decided early, the
  details later should be free. No gradients: almost free in time and memory.
- ``latent`` ("Training-Free Layout Control with Cross-Attention Guidance", Chen, Laina, Vedaldi
  2023; BoxDiff, ICCV 2023): during the guided steps, the energy ``sum_i (1 - inside_i)^2`` of each
  posed handle's attention share inside its mask is lowered by a gradient step on the latent
  before the step's prediction. Stronger, but it costs a UNet forward and backward per guided step.

Both run inside diffusers' own pipeline: a cross-attention processor (``attention``), and the
pipeline's step-end callback plus prepared initial latents (``latent``); no copy of its loop.
A handle with the blank pose is not guided. The mode is ``sample.pose_guidance`` (config.py).

Example::

    guide = PoseGuide(columns, masks, strength=4.0, steps=15, uncond_rows=1)  # as PoseSampler.pose_guide
    with guided_attention(pipe.unet, guide):
        pipe(prompt_embeds=..., callback_on_step_end=guide.on_step_end)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from lowmcgm.attention_capture import CapturingCrossAttnProcessor, compute_map_grid


@dataclass
class PoseGuide:
    """The guided key columns, their masks, and how strongly to guide at the current step.

    Attributes:
        columns: key positions to guide: handle tokens (in the 77 text tokens) and mask tokens.
        masks: (S, H, W) float in [0, 1], the pose mask of each column at image resolution
            (its aspect gives each layer's map shape).
        strength: the logit bias at the first step (``attention``) or the latent step size
            (``latent``).
        steps: how many denoising steps are guided; the weight fades to 0 over them.
        uncond_rows: leading batch rows of the unconditional branch (diffusers puts it first),
            which are never guided; 0 without classifier-free guidance.
    """

    columns: list[int]
    masks: torch.Tensor
    strength: float
    steps: int
    uncond_rows: int = 0
    step: int = 0
    _resized: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def weight(self) -> float:
        """Linear fade: ``strength`` at step 0, 0 from step ``steps`` on."""
        if self.step >= self.steps or not self.columns:
            return 0.0
        return self.strength * (1.0 - self.step / self.steps)

    def masks_at(self, num_queries: int) -> torch.Tensor:
        """(S, N) masks averaged down to a layer's (h, w) map of ``num_queries`` positions, which
        has the masks' (the image's) aspect (``compute_map_grid``)."""
        if num_queries not in self._resized:
            grid = compute_map_grid(num_queries, self.masks.shape[-2:])
            small = F.adaptive_avg_pool2d(self.masks[None].float(), grid)[0]  # (S, h, w)
            self._resized[num_queries] = small.flatten(1)
        return self._resized[num_queries]

    def bias(self, batch: int, num_queries: int, num_keys: int, like: torch.Tensor) -> torch.Tensor | None:
        """The (B, 1, N, L) logit bias of one cross-attention call, or None when not guiding."""
        w = self.weight()
        if w == 0.0:
            return None
        bias = torch.zeros(batch, 1, num_queries, num_keys, device=like.device, dtype=torch.float32)
        masks = self.masks_at(num_queries).to(like.device)  # (S, N), soft at coarse layers
        bias[self.uncond_rows:, 0, :, self.columns] = w * (2.0 * masks.T - 1.0)
        return bias

    def on_step_end(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        """diffusers' ``callback_on_step_end``: move the fade on by one step."""
        self.step = step + 1
        return kwargs


def guided_columns(text_ids: list[int], handle_ids: list[int], pose_masks: torch.Tensor,
                   mask_token_start: int | None) -> tuple[list[int], torch.Tensor]:
    """Pair each posed handle's key columns with its pose mask.

    Args:
        text_ids: the prompt's token ids (77).
        handle_ids: per handle of the prompt (in mask-token order), its token id.
        pose_masks: (k, H, W) per handle; all zeros for the blank pose (not guided).
        mask_token_start: key position of the first mask token (77), or None without mask tokens.

    Returns:
        The columns and a (S, H, W) mask per column. A handle cut off past the 77th token keeps
        only its mask token's column.
    """
    columns, masks = [], []
    for i, token in enumerate(handle_ids):
        if not bool(pose_masks[i].any()):
            continue  # the blank pose: no guidance
        for position, value in enumerate(text_ids):
            if value == token:
                columns.append(position)
                masks.append(pose_masks[i])
        if mask_token_start is not None:
            columns.append(mask_token_start + i)
            masks.append(pose_masks[i])
    if not masks:
        return [], pose_masks.new_zeros(0, *pose_masks.shape[1:])
    return columns, torch.stack(masks)


@contextlib.contextmanager
def guided_attention(unet: Any, guide: PoseGuide) -> Iterator[None]:
    """Every cross-attention layer of ``unet`` biased by ``guide`` while inside.

    Layers that already capture (training previews, attention pictures) keep their processor and
    get the guide too, so their captured maps are the guided ones.
    """
    current = dict(unet.attn_processors)
    replaced, extended = {}, []
    for name, proc in current.items():
        if not name.endswith("attn2.processor"):
            continue
        if isinstance(proc, CapturingCrossAttnProcessor):
            extended.append((proc, proc.guide))
            proc.guide = guide
        else:
            replaced[name] = proc
            current[name] = CapturingCrossAttnProcessor(None, name.removesuffix(".processor"), guide)
    unet.set_attn_processor(current)
    try:
        yield
    finally:
        restored = dict(unet.attn_processors)
        restored.update(replaced)
        unet.set_attn_processor(restored)
        for proc, previous in extended:
            proc.guide = previous


def attention_energy(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``sum_s (1 - share of column s's attention inside its mask) ** 2`` (Chen et al. 2023, eq. 5).

    Args:
        maps: (S, h, w) attention probabilities of the guided columns (one sample).
        masks: (S, H, W) the columns' masks, pooled here to (h, w).
    """
    small = F.adaptive_avg_pool2d(masks[None].float(), maps.shape[-2:])[0].to(maps.device)
    inside = (maps * small).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-8)
    return ((1.0 - inside) ** 2).sum()


# Strength when none is given, per mode: a logit bias (``attention``; logits at SD's cross-attention
# layers span a few units, so 3 moves a token's share well inside without saturating the softmax;
# 10 posed better in the toy world, but would swamp those logits), or hundredths of the latent's RMS
# per guided step (``latent``: 10 against 3 raised the pose benchmark's IoU from 0.28 to 0.41 on the
# gated toy weights, with every subject count better and identity no worse; docs/benchmarks.md).
DEFAULT_STRENGTH = {"attention": 3.0, "latent": 10.0}
LATENT_STEP_FRACTION = 0.01  # latent mode moves the latent by strength x this x its RMS per step


class LatentGuidance:
    """``latent`` mode: before each guided step's prediction, a gradient step on the latent.

    The energy reads the cross-attention maps that ``store`` captures on ``layers`` (the level the
    attention loss reads, 16x16 on SD at 512 px) from a conditional-only UNet pass.

    Args:
        unet: the pipeline's UNet, with capture installed on the energy's layers into ``store``.
        store: the capture store.
        context: (B, 77 + k, d) the conditional context of the B images.
        guide: columns, masks, strength and the fade.
        added_cond_kwargs: SDXL's ``{"text_embeds": (B, p), "time_ids": (B, 6)}`` of the same
            conditional rows (an SDXL UNet cannot run without them); None for SD 1.x/2.x.
    """

    def __init__(self, unet: Any, store: Any, context: torch.Tensor, guide: PoseGuide,
                 added_cond_kwargs: dict[str, torch.Tensor] | None = None, checkpointing: bool = True):
        self.unet, self.store, self.context, self.guide = unet, store, context, guide
        self.added_cond_kwargs = added_cond_kwargs
        self.checkpointing = checkpointing

    def step(self, latents: torch.Tensor, timestep: torch.Tensor, scale_input: Any) -> torch.Tensor:
        """The guided latent for one step (unchanged once the fade reaches 0)."""
        w = self.guide.weight()
        if w == 0.0:
            return latents
        key_index = torch.tensor(self.guide.columns)[None].expand(latents.shape[0], -1)
        with torch.enable_grad(), _checkpointed(self.unet, self.checkpointing):
            x = latents.detach().requires_grad_(True)
            self.store.begin(key_index)
            self.unet(scale_input(x, timestep), timestep, self.context, added_cond_kwargs=self.added_cond_kwargs)
            self.store.end()
            maps = self.store.mean_maps(x.shape[-2:]).float()  # (B, S, h, w), the latent's aspect
            energy = sum(attention_energy(m, self.guide.masks) for m in maps)
            (grad,) = torch.autograd.grad(energy, x)
            # Only now: a UNet with gradient checkpointing recomputes its blocks in the backward above,
            # which must capture as the forward did. The pipeline's own passes record nothing (or
            # what they did before).
            self.store.clear()
        # Per image: a batch of seeds must give each image what it gets alone.
        shape = (-1,) + (1,) * (latents.dim() - 1)
        rms = grad.float().flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12).view(shape)
        size = w * LATENT_STEP_FRACTION * latents.float().flatten(1).pow(2).mean(1).sqrt().view(shape)
        return (latents.float() - size * grad.float() / rms).to(latents.dtype)

    def on_step_end(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        """Guide the latent of the next step (the callback runs after step ``step``)."""
        self.guide.step = step + 1
        timesteps = pipe.scheduler.timesteps
        if self.guide.step < len(timesteps) and self.guide.weight() > 0:
            t = timesteps[self.guide.step]
            kwargs["latents"] = self.step(kwargs["latents"], t, pipe.scheduler.scale_model_input)
        return kwargs


@contextlib.contextmanager
def _checkpointed(unet: Any, on: bool) -> Iterator[None]:
    """Gradient checkpointing on for latent guidance's pass, unless the UNet has it already (training
    previews). Its backward to the latent then keeps each block's input instead of every activation:
    SDXL at 1024 px 0.6 GiB above the weights instead of 9.4, SD 1.5 at 512 px 0.2 instead of 0.7
    (``lowmcgm.memory.sampling``), for one more UNet forward per guided step."""
    if not on or getattr(unet, "is_gradient_checkpointing", True):
        yield
        return
    unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        unet.disable_gradient_checkpointing()
