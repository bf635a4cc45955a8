"""Pose guidance at sampling: pull each posed subject into its pose mask through cross-attention.

A mask token alone says what, hardly where (docs/method.md, "Why the mask alone does not set the
pose"). These training-free mechanisms act where position lives, on the cross-attention maps:

- ``attention`` (DenseDiffusion, Kim et al. ICCV 2023): on every cross-attention layer, during
  the guided steps, the conditional branch's logits change. ``dense`` (their rule): each query's
  logits move toward its largest logit for the columns whose mask holds the query and toward its
  smallest for the others, by strength x (1 - the area of the masks holding the query) x
  (t / T)^5: a large mask or a late step needs less. ``fixed`` (lowmcgm's first rule): ``+w``
  inside the mask and ``-w`` outside, on the posed columns only, fading linearly. With
  ``dense`` and a self-attention strength, self-attention too: a key in the query's subject's
  mask moves toward the query's largest logit, the others toward its smallest (DenseDiffusion's
  sreg; layers up to 32x32). No gradients: almost free in time, and in memory but for the
  explicit self-attention logits.
- ``latent`` ("Training-Free Layout Control with Cross-Attention Guidance", Chen, Laina, Vedaldi
  2023; BoxDiff, ICCV 2023): during the guided steps, a gradient step on the latent lowers an
  energy of the posed columns' attention before the step's prediction. ``noise-scaled`` (their
  rule, ``inference.py`` and ``utils.compute_ca_loss``): the energy ``(1 - inside share)^2`` per
  layer, head and column, averaged over heads after squaring, then over a subject's columns,
  the subjects and the layers; the step is strength x sigma_t^2 x its gradient (in the
  scheduler's own latent space, so the same on every scheduler), repeated while the energy is
  above a threshold. Optional: a separation term (each subject's share inside the other
  subjects' masks, squared) and each subject's miss measured from what evenly spread attention
  would score. ``normalized`` (lowmcgm's first rule): the energy of the maps averaged over
  layers and heads, a step of a fixed fraction of the latent's RMS, fading out. It costs a UNet
  forward and backward per iteration.

Both run inside diffusers' own pipeline: a cross-attention processor (``attention``, here), and the
pipeline's step-end callback plus prepared initial latents (``latent``, ``latent_guidance.py``);
no copy of its loop.
A handle with the blank pose is not guided. The settings are ``[sample]``'s ``pose_guidance*``
fields (config.py).

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
from lowmcgm.config import SampleSettings


@dataclass
class PoseGuide:
    """The guided key columns, their masks, and how strongly to guide at the current step.

    Attributes:
        columns: key positions to guide: handle tokens (in the 77 text tokens) and mask tokens.
        masks: (S, H, W) float in [0, 1], the pose mask of each column at image resolution
            (its aspect gives each layer's map shape).
        strength: the logit change (``attention``) or the latent step's scale (``latent``).
        steps: how many denoising steps are guided.
        uncond_rows: leading batch rows of the unconditional branch (diffusers puts it first),
            which are never guided; 0 without classifier-free guidance.
        subjects: per column, the index of its posed handle (a handle's text and mask-token
            columns are one subject); None: each column its own.
        fade: the weight falls linearly to 0 over the guided steps (the ``fixed`` and
            ``normalized`` rules); else it stays at ``strength``.
        bias_rule: ``attention`` mode's logit change, ``dense`` or ``fixed`` (config.py).
        self_strength: ``dense`` on self-attention too, with this strength (0: not).
        noise_level: t / T of the step about to run, which ``dense`` decays with.
    """

    columns: list[int]
    masks: torch.Tensor
    strength: float
    steps: int
    uncond_rows: int = 0
    subjects: list[int] | None = None
    fade: bool = True
    bias_rule: str = SampleSettings.pose_guidance_bias
    self_strength: float = SampleSettings.pose_guidance_self_attention
    noise_level: float = 1.0
    step: int = 0
    _resized: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.subjects is None:
            self.subjects = list(range(len(self.columns)))

    def weight(self) -> float:
        """``strength`` while guiding (falling linearly to 0 over the guided steps with ``fade``),
        0 from step ``steps`` on."""
        if self.step >= self.steps or not self.columns:
            return 0.0
        return self.strength * (1.0 - self.step / self.steps) if self.fade else self.strength

    def masks_at(self, num_queries: int) -> torch.Tensor:
        """(S, N) masks averaged down to a layer's (h, w) map of ``num_queries`` positions, which
        has the masks' (the image's) aspect (``compute_map_grid``)."""
        if num_queries not in self._resized:
            grid = compute_map_grid(num_queries, self.masks.shape[-2:])
            small = F.adaptive_avg_pool2d(self.masks[None].float(), grid)[0]  # (S, h, w)
            self._resized[num_queries] = small.flatten(1)
        return self._resized[num_queries]

    def bias(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor | None:
        """The logit change of one cross-attention call, or None when not guiding.

        Args:
            query: (B, H, N, D) and key: (B, H, L, D), as the processor has them.
            scale: the layer's logit scale.

        Returns:
            (B, 1, N, L) (``fixed``) or (B, H, N, L) (``dense``) float32; zero on the
            unconditional rows.
        """
        w = self.weight()
        if w == 0.0:
            return None
        batch, heads, num_queries, _ = query.shape
        num_keys = key.shape[2]
        masks = self.masks_at(num_queries).to(query.device)  # (S, N), soft at coarse layers
        if self.bias_rule == "fixed":
            bias = torch.zeros(batch, 1, num_queries, num_keys, device=query.device, dtype=torch.float32)
            bias[self.uncond_rows:, 0, :, self.columns] = w * (2.0 * masks.T - 1.0)
            return bias
        # DenseDiffusion (their mod_forward, cross-attention branch): per query, every key's logit
        # moves toward the query's largest logit where the key's mask holds the query, toward its
        # smallest elsewhere (keys that are no posed column count as outside, as theirs).
        rows = slice(self.uncond_rows, None)
        logits = torch.matmul(query[rows].float(), key[rows].float().transpose(-1, -2)) * scale  # (b, H, N, L)
        highest, lowest = logits.amax(-1, keepdim=True), logits.amin(-1, keepdim=True)
        inside = torch.zeros(num_queries, num_keys, device=query.device)
        inside[:, self.columns] = masks.T
        rate = w * self.noise_level ** 5 * (1.0 - self._area_per_query(masks)).clamp_min(0.0)[:, None]  # (N, 1)
        bias = torch.zeros(batch, heads, num_queries, num_keys, device=query.device, dtype=torch.float32)
        bias[rows] = rate * (inside * (highest - logits) - (1.0 - inside) * (logits - lowest))
        return bias

    def self_bias(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor | None:
        """DenseDiffusion's change on a self-attention call: (B, H, N, N) float32, or None.

        Their ``mod_forward``, self-attention branch: a key in the query's subject's mask moves
        toward the query's largest logit, every other key toward its smallest, by ``self_strength``
        x (1 - the area of the masks holding the query) x (t / T)^5.
        """
        if self.bias_rule != "dense" or self.self_strength == 0.0 or self.weight() == 0.0:
            return None
        batch, heads, num_queries, _ = query.shape
        per_subject = self._per_subject(self.masks_at(num_queries).to(query.device))  # (k, N)
        together = (per_subject.T @ per_subject).clamp(max=1.0)  # (N, N): query and key in one subject
        rows = slice(self.uncond_rows, None)
        logits = torch.matmul(query[rows].float(), key[rows].float().transpose(-1, -2)) * scale
        highest, lowest = logits.amax(-1, keepdim=True), logits.amin(-1, keepdim=True)
        area = (per_subject * per_subject.mean(1, keepdim=True)).sum(0)
        rate = self.self_strength * self.noise_level ** 5 * (1.0 - area).clamp_min(0.0)[:, None]
        bias = torch.zeros(batch, heads, num_queries, num_queries, device=query.device, dtype=torch.float32)
        bias[rows] = rate * (together * (highest - logits) - (1.0 - together) * (logits - lowest))
        return bias

    def _per_subject(self, masks: torch.Tensor) -> torch.Tensor:
        """(k, N): one of ``masks``' rows per subject (its columns share the mask)."""
        first = {subject: i for i, subject in reversed(list(enumerate(self.subjects)))}
        return masks[list(first.values())]

    def _area_per_query(self, masks: torch.Tensor) -> torch.Tensor:
        """(N,) the summed area (share of the image) of the subjects' masks holding each query
        (DenseDiffusion's ``reg_sizes``: 0 in the background, a subject's area inside it)."""
        per_subject = self._per_subject(masks)
        return (per_subject * per_subject.mean(1, keepdim=True)).sum(0)

    def on_step_end(self, pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        """diffusers' ``callback_on_step_end``: move on to the next step (its index and noise level)."""
        self.step = step + 1
        if pipe is not None and self.step < len(pipe.scheduler.timesteps):
            self.noise_level = noise_level(pipe.scheduler, pipe.scheduler.timesteps[self.step])
        return kwargs


def noise_level(scheduler: Any, timestep: Any) -> float:
    """t / T of ``timestep`` on ``scheduler``'s training schedule (DenseDiffusion's t / 1000)."""
    return float(timestep) / scheduler.config.num_train_timesteps


def guided_columns(text_ids: list[int], handle_ids: list[int], pose_masks: torch.Tensor,
                   mask_token_start: int | None) -> tuple[list[int], torch.Tensor, list[int]]:
    """Pair each posed handle's key columns with its pose mask.

    Args:
        text_ids: the prompt's token ids (77).
        handle_ids: per handle of the prompt (in mask-token order), its token id.
        pose_masks: (k, H, W) per handle; all zeros for the blank pose (not guided).
        mask_token_start: key position of the first mask token (77), or None without mask tokens.

    Returns:
        The columns, a (S, H, W) mask per column, and per column the index of its handle. A
        handle cut off past the 77th token keeps only its mask token's column.
    """
    columns, masks, subjects = [], [], []
    for i, token in enumerate(handle_ids):
        if not bool(pose_masks[i].any()):
            continue  # the blank pose: no guidance
        for position, value in enumerate(text_ids):
            if value == token:
                columns.append(position)
                masks.append(pose_masks[i])
                subjects.append(i)
        if mask_token_start is not None:
            columns.append(mask_token_start + i)
            masks.append(pose_masks[i])
            subjects.append(i)
    if not masks:
        return [], pose_masks.new_zeros(0, *pose_masks.shape[1:]), []
    return columns, torch.stack(masks), subjects


# Self-attention guidance materialises each guided layer's (B, H, N, N) logits; past 32x32 maps
# (SD's 64x64 layers at 512 px: 0.5 GiB per image in float32) it leaves the layer as it is.
SELF_ATTENTION_MAX_QUERIES = 1024


class GuidedSelfAttnProcessor:
    """A self-attention layer with ``guide.self_bias`` added to its logits while it guides; the
    layer's own processor otherwise (and on layers too large to guide, or unlike SD's).

    Args:
        guide: the pose guide.
        own: the processor it stands in for.
    """

    def __init__(self, guide: PoseGuide, own: Any):
        self.guide, self.own = guide, own

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        plain = (hidden_states.ndim != 3 or encoder_hidden_states is not None or attention_mask is not None
                 or attn.spatial_norm is not None or attn.group_norm is not None
                 or hidden_states.shape[1] > SELF_ATTENTION_MAX_QUERIES or self.guide.self_strength == 0.0
                 or self.guide.weight() == 0.0)
        if plain:
            return self.own(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        bias = self.guide.self_bias(query, key, attn.scale)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def guided_attention(unet: Any, guide: PoseGuide) -> Iterator[None]:
    """Every cross-attention layer of ``unet`` biased by ``guide`` while inside (and every
    self-attention layer, with ``guide.self_strength``).

    Layers that already capture (training previews, attention pictures) keep their processor and
    get the guide too, so their captured maps are the guided ones.
    """
    current = dict(unet.attn_processors)
    replaced, extended = {}, []
    for name, proc in current.items():
        if name.endswith("attn1.processor") and guide.self_strength and guide.bias_rule == "dense":
            replaced[name] = proc
            current[name] = GuidedSelfAttnProcessor(guide, proc)
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


# Strength when none is given, per rule (``pose_guidance_bias`` for ``attention``,
# ``pose_guidance_step`` for ``latent``): ``fixed``, a logit bias (logits at SD's cross-attention
# layers span a few units, so 3 moves a token's share well inside without saturating the softmax);
# ``dense``, the share of the way to the query's extreme logit (DenseDiffusion's creg, 1);
# ``normalized``, hundredths of the latent's RMS per guided step (10 against 3 raised the pose
# benchmark's IoU from 0.28 to 0.41 on the gated toy weights; docs/benchmarks.md);
# ``noise-scaled``, the energy's scale (layout-guidance's loss_scale, 30).
DEFAULT_STRENGTH = {"fixed": 3.0, "dense": 1.0, "normalized": 10.0, "noise-scaled": 30.0}


def guidance_rule(settings: SampleSettings) -> str:
    """The rule ``settings.pose_guidance`` guides by (a key of ``DEFAULT_STRENGTH``); '' for none."""
    return {"attention": settings.pose_guidance_bias, "latent": settings.pose_guidance_step}.get(
        settings.pose_guidance, "")
