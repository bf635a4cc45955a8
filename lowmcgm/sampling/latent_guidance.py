"""Latent pose guidance: gradient steps on the latent that pull each posed subject's attention
into its mask (``sample.pose_guidance = latent``; the rules are described in ``pose_guidance``).

``LatentGuidance`` runs inside diffusers' pipeline through its step-end callback (and the
prepared initial latents); the energies are ``attention_energy`` (the ``normalized`` rule) and
``layout_energy`` (``noise-scaled``, layout-guidance's ``compute_ca_loss``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from lowmcgm.attention_capture import CrossAttentionStore, install_capture, loss_layer_names, remove_capture
from lowmcgm.config import SampleSettings
from lowmcgm.sampling.pose_guidance import PoseGuide

LATENT_STEP_FRACTION = 0.01  # the normalized rule moves the latent by strength x this x its RMS per step


def attention_energy(maps: torch.Tensor, masks: torch.Tensor, subjects: list[int] | None = None,
                     presence: float = 0.0) -> torch.Tensor:
    """``sum_s (1 - share of column s's attention inside its mask) ** 2`` (the ``normalized`` rule),
    plus ``presence`` x each posed subject's ``presence_miss`` when two or more subjects are posed.

    Args:
        maps: (S, h, w) attention probabilities of the guided columns (one sample).
        masks: (S, H, W) the columns' masks, pooled here to (h, w).
        subjects: per column, its subject (needed for ``presence`` only).
        presence: weight of BoxDiff's inner-box term between the posed subjects; 0: none.
    """
    small = F.adaptive_avg_pool2d(masks[None].float(), maps.shape[-2:])[0].to(maps.device)
    inside = (maps * small).flatten(1).sum(1) / maps.flatten(1).sum(1).clamp_min(1e-8)
    energy = ((1.0 - inside) ** 2).sum()
    subject_ids = sorted(set(subjects or []))
    if presence and len(subject_ids) > 1:
        owner = torch.tensor(subjects, device=maps.device)
        energy = energy + presence * presence_miss(maps.flatten(1)[None], small.flatten(1), owner, subject_ids).sum()
    return energy


# A mask covering (nearly) the whole image: evenly spread attention already scores (nearly) 1, so
# the area-normalised miss divides by at least this much instead of by (nearly) 0.
MIN_OUTSIDE_SHARE = 0.05


# BoxDiff's inner-box constraint reads the top 20 % of the pixels inside a box (its config's P).
PRESENCE_TOP_SHARE = 0.2


def layout_energy(layer_maps: list[torch.Tensor], masks: torch.Tensor, subjects: list[int],
                  separation: float = 0.0, area_normalized: bool = False, presence: float = 0.0) -> torch.Tensor:
    """Per image, the ``noise-scaled`` rule's energy (layout-guidance's ``compute_ca_loss``).

    Per layer, head and column: ``(1 - inside share)^2``; averaged over heads (after squaring,
    so that one head in the mask does not hide the others), over each subject's columns, over the
    subjects and over the layers.

    Args:
        layer_maps: per layer, (B, H, S, h, w) attention probabilities of the guided columns.
        masks: (S, H, W) the columns' masks, pooled here to each layer's (h, w).
        subjects: per column, its subject.
        separation: weight of ``(share inside the other subjects' masks)^2`` (BoxDiff's outer
            constraint, on the other subjects' masks); 0: none.
        area_normalized: the miss ``1 - inside`` divided by ``1 - area`` of the mask, which is
            what evenly spread attention misses by: every subject starts from 1, whatever its size.
        presence: weight of ``presence_miss`` (BoxDiff's inner-box constraint between the posed
            subjects: each must win the pixels of its own mask); 0: none. Needs two subjects.

    Returns:
        (B,) energies in float32.
    """
    subject_ids = sorted(set(subjects))
    owner = torch.tensor(subjects, device=layer_maps[0].device)
    total = 0.0
    for maps in layer_maps:
        small = F.adaptive_avg_pool2d(masks[None].float(), maps.shape[-2:])[0].flatten(1).to(maps.device)  # (S, n)
        probs = maps.flatten(-2).float()  # (B, H, S, n)
        mass = probs.sum(-1).clamp_min(1e-8)
        miss = 1.0 - (probs * small).sum(-1) / mass  # (B, H, S)
        if area_normalized:
            miss = miss / (1.0 - small.mean(-1)).clamp_min(MIN_OUTSIDE_SHARE)
        energy = miss ** 2
        if separation:
            others = torch.stack([small[owner != owner[c]].amax(0) if bool((owner != owner[c]).any())
                                  else torch.zeros_like(small[c]) for c in range(len(subjects))])
            stray = (probs * others * (1.0 - small)).sum(-1) / mass  # share inside others' masks only
            energy = energy + separation * stray ** 2
        energy = energy.mean(1)  # (B, S): heads averaged after squaring
        per_subject = torch.stack([energy[:, owner == i].mean(-1) for i in subject_ids], -1)  # (B, K)
        if presence and len(subject_ids) > 1:
            per_subject = per_subject + presence * presence_miss(probs.mean(1), small, owner, subject_ids)
        total = total + per_subject.mean(-1)
    return total / len(layer_maps)


def presence_miss(maps: torch.Tensor, masks: torch.Tensor, owner: torch.Tensor, subject_ids: list[int]
                  ) -> torch.Tensor:
    """Per subject, ``1 - `` its mean share of the posed subjects' attention over the top
    ``PRESENCE_TOP_SHARE`` of the pixels inside its mask (BoxDiff's inner-box constraint, with the
    other posed subjects as the competition rather than every word of the prompt).

    A subject lost to another one (the other's handle takes both masks) scores near 1; a subject
    that wins part of its own mask scores near 0, however the rest of its mask looks.

    Args:
        maps: (B, S, n) attention probabilities of the guided columns, heads averaged.
        masks: (S, n) each column's mask at the maps' resolution.
        owner: (S,) each column's subject.

    Returns:
        (B, K) misses in [0, 1], subjects in ``subject_ids`` order.
    """
    mass = torch.stack([maps[:, owner == i].sum(1) for i in subject_ids], 1)  # (B, K, n)
    share = mass / mass.sum(1, keepdim=True).clamp_min(1e-8)
    misses = []
    for k, i in enumerate(subject_ids):
        inside = masks[owner == i][0] > 0.5
        if not bool(inside.any()):  # a mask smaller than one pixel of this layer
            misses.append(share.new_zeros(share.shape[0]))
            continue
        values = share[:, k, inside]  # (B, m)
        top = max(1, int(PRESENCE_TOP_SHARE * values.shape[-1]))
        misses.append(1.0 - values.topk(top, dim=-1).values.mean(-1))
    return torch.stack(misses, -1)


def guidance_layers(unet: Any, choice: str) -> list[str]:
    """The cross-attention processors latent guidance reads (``sample.pose_guidance_layers``).

    ``loss``: the level the attention loss reads by default (16x16 maps on SD at 512 px: down and
    up blocks). ``down``: that level's down blocks only, so the guidance pass ends there (about a
    third of the UNet). ``mid-up``: the mid block and that level's up blocks (layout-guidance reads
    SD's mid block and ``up_blocks.1``, 8x8 and 16x16 at 512 px).
    """
    loss = loss_layer_names(unet, 0)
    if choice == "loss":
        return loss
    if choice == "down":
        return [name for name in loss if name.startswith("down_blocks")]
    mid = [name for name in unet.attn_processors if name.startswith("mid_block") and name.endswith("attn2.processor")]
    return mid + [name for name in loss if name.startswith("up_blocks")]


class LatentGuidance:
    """``latent`` mode: before each guided step's prediction, gradient steps on the latent.

    The energy reads the cross-attention maps of ``layers``, captured from a conditional-only UNet
    pass; the capture is installed for that pass only (attention pictures and previews capturing
    on the same layers get their processors back untouched).

    Args:
        unet: the pipeline's UNet.
        layers: the attn2 processors the energy reads (``guidance_layers``).
        context: (B, 77 + k, d) the conditional context of the B images.
        guide: columns, masks, subjects, strength and steps.
        settings: the rule, iterations, threshold, separation and area normalisation.
        added_cond_kwargs: SDXL's ``{"text_embeds": (B, p), "time_ids": (B, 6)}`` of the same
            conditional rows (an SDXL UNet cannot run without them); None for SD 1.x/2.x.
    """

    def __init__(self, unet: Any, layers: list[str], context: torch.Tensor, guide: PoseGuide,
                 settings: SampleSettings = SampleSettings(),
                 added_cond_kwargs: dict[str, torch.Tensor] | None = None, checkpointing: bool = True,
                 truncated: bool = True):
        self.unet, self.layers, self.context, self.guide = unet, layers, context, guide
        self.settings = settings
        self.added_cond_kwargs = added_cond_kwargs
        self.checkpointing = checkpointing
        # The block after which the pass may stop, found once; None: the whole UNet runs (for comparisons).
        self.stop_after = last_block(layers) if truncated else None

    def step(self, latents: torch.Tensor, timestep: torch.Tensor, scheduler: Any) -> torch.Tensor:
        """The guided latent for one step (unchanged once the guided steps are over).

        Args:
            latents: (B, C, h, w) in the scheduler's latent space.
            timestep: the step about to run.
            scheduler: gives ``scale_model_input`` and ``alphas_cumprod`` (the noise level).
        """
        w = self.guide.weight()
        if w == 0.0:
            return latents
        s = self.settings
        for _ in range(s.pose_guidance_iterations):
            energy, grad = self._energy_and_grad(latents, timestep, scheduler)
            moving = (energy > s.pose_guidance_threshold).float()  # (B,): each image on its own
            if not bool(moving.any()):
                break
            shape = (-1,) + (1,) * (latents.dim() - 1)
            if s.pose_guidance_step == "normalized":
                # Per image: a batch of seeds must give each image what it gets alone.
                rms = grad.float().flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12).view(shape)
                size = w * LATENT_STEP_FRACTION * latents.float().flatten(1).pow(2).mean(1).sqrt().view(shape)
                delta = size * grad.float() / rms
            else:
                delta = w * _noise_step_scale(scheduler, timestep) * grad.float()
            latents = (latents.float() - moving.view(shape) * delta).to(latents.dtype)
        return latents

    def _energy_and_grad(self, latents: torch.Tensor, timestep: torch.Tensor, scheduler: Any
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) energies and their gradient with respect to ``latents``."""
        store = CrossAttentionStore(keep_heads=self.settings.pose_guidance_step == "noise-scaled")
        key_index = torch.tensor(self.guide.columns)[None].expand(latents.shape[0], -1)
        installed = install_capture(self.unet, self.layers, store)
        stop = contextlib.nullcontext() if self.stop_after is None else _stopped_after(self.unet, self.stop_after)
        try:
            with torch.enable_grad(), _checkpointed(self.unet, self.checkpointing):
                x = latents.detach().requires_grad_(True)
                store.begin(key_index)
                with stop:
                    self.unet(scheduler.scale_model_input(x, timestep), timestep, self.context,
                              added_cond_kwargs=self.added_cond_kwargs)
                store.end()
                energy = self._energy(store, x.shape[-2:])
                (grad,) = torch.autograd.grad(energy.sum(), x)
                # Only now: a UNet with gradient checkpointing recomputes its blocks in the backward
                # above, which must capture as the forward did.
        finally:
            store.clear()
            remove_capture(self.unet, installed)
        return energy.detach(), grad

    def _energy(self, store: CrossAttentionStore, size: torch.Size) -> torch.Tensor:
        s = self.settings
        if s.pose_guidance_step == "normalized":
            maps = store.mean_maps(size).float()  # (B, S, h, w), the latent's aspect
            return torch.stack([attention_energy(m, self.guide.masks, self.guide.subjects, s.pose_guidance_presence)
                                for m in maps])
        return layout_energy(store.head_maps(size), self.guide.masks, self.guide.subjects,
                             s.pose_guidance_separation, s.pose_guidance_area_normalized, s.pose_guidance_presence)

    def on_step_end(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        """Guide the latent of the next step (the callback runs after step ``step``)."""
        self.guide.step = step + 1
        timesteps = pipe.scheduler.timesteps
        if self.guide.step < len(timesteps) and self.guide.weight() > 0:
            kwargs["latents"] = self.step(kwargs["latents"], timesteps[self.guide.step], pipe.scheduler)
        return kwargs


def _noise_step_scale(scheduler: Any, timestep: Any) -> float:
    """The factor of the ``noise-scaled`` step on the pipeline's latent x: sigma_t^2 as
    layout-guidance's ``latents - grad * sigmas[index] ** 2``, with sigma_t^2 = (1 - a_t) / a_t.

    Their latent is a k-diffusion one (LMS: noise of std sigma_t, the model input x / sqrt(1 +
    sigma_t^2)). Schedulers whose latent is the model input (DDIM, DPM-Solver) see the same step
    once moved into their space: with s the scale from the latent to the model input
    (``scale_model_input``; 1 or sqrt(a_t)), the step on x is ``(1 - a_t) / s^2`` x the gradient
    with respect to x, which is sigma_t^2 on LMS/Euler and 1 - a_t on DDIM.
    """
    alpha = float(scheduler.alphas_cumprod[int(timestep)])
    s = float(scheduler.scale_model_input(torch.ones(()), timestep))
    return (1.0 - alpha) / max(s * s, 1e-12)


def last_block(layers: list[str]) -> str:
    """The UNet block (``down_blocks.i``, ``mid_block`` or ``up_blocks.i``) that runs the last of
    ``layers`` (processor names) in the forward pass: down blocks, then the mid block, then up blocks."""
    def order(block: str) -> tuple[int, int]:
        kind, _, index = block.partition(".")
        return {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[kind], int(index or 0)
    blocks = {name.split(".")[0] if name.startswith("mid_block") else ".".join(name.split(".")[:2]) for name in layers}
    return max(blocks, key=order)


class _Enough(Exception):
    """The guided layers have all run: the rest of the UNet cannot change the energy."""


@contextlib.contextmanager
def _stopped_after(unet: Any, block: str) -> Iterator[None]:
    """The UNet's forward ends once ``block``, that of the last guided layer, has run (a forward hook raises,
    the exception is caught here). The energy and its gradient are the same; the blocks after it
    (SD's 32x32 and 64x64 up blocks when the 16x16 maps are read: the largest ones) are not run,
    and their activations are not kept. The hook is gone before the backward, whose recompute
    of checkpointed pieces runs inside the blocks."""
    def stop(module: Any, args: Any, output: Any) -> None:
        raise _Enough

    handle = unet.get_submodule(block).register_forward_hook(stop)
    try:
        yield
    except _Enough:
        pass
    finally:
        handle.remove()


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
