"""Exposing cross-attention probabilities to the losses without materialising attention maps.

The reference replaces every processor with an explicit softmax, self-attention included (268 MB
per 64x64 layer in fp16) and so switches off the xformers it enabled. Here only the
cross-attention layers the losses read (latent side / 4, mid block excluded) get
``CapturingCrossAttnProcessor``; it computes the layer output with SDPA exactly as diffusers'
``AttnProcessor2_0`` and, beside it, the softmax probabilities of the few key columns the losses
need (handles and mask tokens): (B, H, N, S) instead of (B, H, N, 77 + K).

Gradient checkpointing recomputes each block in backward, calling the processor again. The
recomputation must redo the same operations (non-reentrant checkpointing matches saved tensors by
order), but must not store a second copy: the store records only between ``begin`` and ``end``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from lowmcgm.errors import UserError


class CrossAttentionStore:
    """Per forward pass: the selected keys' probabilities, per layer, averaged over heads unless
    ``keep_heads``.

    Example:
        >>> store.begin(key_index)            # (B, S) key positions to expose
        >>> unet(latents, t, context)
        >>> store.end()                        # recomputation in backward records nothing
        >>> maps = store.mean_maps((H, W))     # (B, S, h, w), h/w as H/W
    """

    def __init__(self, keep_heads: bool = False) -> None:
        self.key_index: torch.Tensor | None = None
        self.recording = False
        self.maps: dict[str, torch.Tensor] = {}
        # Training averages the heads at once, to keep less; latent pose guidance's energy squares
        # each head's share before averaging (layout-guidance), so it keeps them.
        self.keep_heads = keep_heads

    def begin(self, key_index: torch.Tensor) -> None:
        self.key_index = key_index
        self.maps = {}
        self.recording = True

    def end(self) -> None:
        # key_index stays set: checkpoint recomputation must rebuild the same graph.
        self.recording = False

    def clear(self) -> None:
        self.key_index, self.maps, self.recording = None, {}, False

    def record(self, layer: str, probs: torch.Tensor) -> None:
        """probs: (B, H, N, S) float32."""
        if not self.recording:
            return
        if layer in self.maps:
            raise RuntimeError(f"layer {layer} captured twice in one forward pass")
        self.maps[layer] = probs if self.keep_heads else probs.mean(1)  # (B, H, N, S) or (B, N, S)

    def mean_maps(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Average over layers (and heads) -> (B, S, h, w).

        Args:
            size: (H, W) of the image or latent the UNet ran on, which sets the maps' aspect (see
                ``compute_map_grid``); None for square maps (training crops are square).
        """
        if not self.maps:
            raise RuntimeError("no attention maps captured: was the UNet called between begin() and end()?")
        maps = [m.mean(1) for m in self.maps.values()] if self.keep_heads else list(self.maps.values())
        mean = torch.stack(maps).mean(0)  # (B, N, S)
        rows, cols = compute_map_grid(mean.shape[1], size)
        return mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], rows, cols)

    def head_maps(self, size: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """Per layer, every head's maps: (B, H, S, h, w) (a store made with ``keep_heads``)."""
        if not self.keep_heads:
            raise RuntimeError("this store averaged the heads: make it with keep_heads=True")
        if not self.maps:
            raise RuntimeError("no attention maps captured: was the UNet called between begin() and end()?")
        out = []
        for probs in self.maps.values():  # (B, H, N, S)
            rows, cols = compute_map_grid(probs.shape[2], size)
            out.append(probs.transpose(2, 3).reshape(*probs.shape[:2], probs.shape[3], rows, cols))
        return out


def compute_map_grid(num_queries: int, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(rows, cols) of a cross-attention map with ``num_queries`` positions.

    The UNet halves its latent per level with stride-2 convolutions (kernel 3, padding 1), so a
    side of n becomes ceil(n / 2); and the VAE divides the image's sides exactly (pipelines take
    multiples of 8 px). A layer's map is therefore the halving of the image's or latent's
    ``size`` that has ``num_queries`` positions: sizes shrink at each halving, so at most one can.
    When none does (an image off the 8 px grid), the factor pair nearest ``size``'s aspect (for a
    square size and count, the square map).

    Args:
        num_queries: the layer's query count, rows x cols.
        size: (H, W) of the image or latent the UNet ran on; None for a square map.
    """
    if size is None:
        side = math.isqrt(num_queries)
        return side, side
    rows, cols = int(size[0]), int(size[1])
    while rows * cols > num_queries:
        rows, cols = -(-rows // 2), -(-cols // 2)  # ceil halving, as the UNet's downsampling
    if rows * cols == num_queries:
        return rows, cols
    pairs = [(r, num_queries // r) for r in range(1, num_queries + 1) if num_queries % r == 0]
    return min(pairs, key=lambda pair: abs(math.log(pair[0] * int(size[1]) / (pair[1] * int(size[0])))))


def compute_selected_probs(query: torch.Tensor, key: torch.Tensor, key_index: torch.Tensor,
                           scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) restricted to the columns ``key_index`` names.

    The normaliser needs every key's logit; at the loss layers that is (B, H, N, 77 + K), tiny
    next to self-attention. Only the (B, H, N, S) columns leave this function.

    Args:
        query: (B, H, N, D). key: (B, H, L, D). key_index: (B, S) long.
        bias: (B, 1 or H, N, L) added to the logits (pose guidance), or None.

    Returns:
        (B, H, N, S) float32 probabilities.
    """
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale  # (B, H, N, L)
    if bias is not None:
        logits = logits + bias.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    b, h, n, _ = logits.shape
    index = key_index.to(logits.device)[:, None, None, :].expand(b, h, n, key_index.shape[1])
    return torch.exp(torch.gather(logits, -1, index) - lse)


class CapturingCrossAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` for cross-attention, plus capture of selected key columns.

    Args:
        store: where captured probabilities go, or None (no capture: a guided layer only).
        layer: the layer's name, for the store and messages.
        guide: adds a bias to the attention logits (``pose_guidance.PoseGuide``), or None. The
            captured probabilities include it, so attention pictures show the guided maps.
    """

    def __init__(self, store: CrossAttentionStore | None, layer: str, guide: Any = None):
        self.store = store
        self.layer = layer
        self.guide = guide

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise RuntimeError(f"{self.layer}: capture is for cross-attention layers only")
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross:
            raise RuntimeError(f"{self.layer}: attention variant not used by SD UNets")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, D)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, L, D)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        bias = self.guide.bias(query, key, attn.scale) if self.guide is not None else None
        if self.store is not None and self.store.key_index is not None:
            self.store.record(self.layer, compute_selected_probs(query, key, self.store.key_index, attn.scale, bias))
        if bias is not None:
            bias = bias.to(query.dtype)
            attention_mask = bias if attention_mask is None else attention_mask + bias

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _block_level(name: str, num_levels: int) -> int | None:
    """Downsampling level of an attention processor's block (0 = full latent size)."""
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return num_levels - 1 - int(parts[1])
    return None  # mid block: excluded, as the paper's loss layers


# The paper reads 16x16 maps (SD at 512 px: latent side / 4). A model-derived choice aims for
# the same map size, so small models (the toy world's 64 px images) read maps that still mean something.
TARGET_MAP_PX = 16


def auto_downscale(unet: UNet2DConditionModel, latent_px: int) -> int:
    """The cross-attention level whose maps are closest to 16 px (ties: the larger maps).

    SD 1.x/2.x at 512 px and at 768 px give 4 (16x16 and 24x24 maps), as the paper; the tiny and
    toy models (32x32 latents) give 2 (16x16 maps).
    """
    num_levels = len(unet.config.block_out_channels)
    levels = sorted({_block_level(n, num_levels) for n in unet.attn_processors if n.endswith("attn2.processor")}
                    - {None})
    if not levels:
        raise UserError("This UNet has no cross-attention layers outside its mid block.")
    best = min(levels, key=lambda level: (abs((latent_px >> level) - TARGET_MAP_PX), level))
    return 2**best


def loss_layer_names(unet: UNet2DConditionModel, downscale: int, latent_px: int | None = None) -> list[str]:
    """Cross-attention processors whose maps are latent side / ``downscale``.

    For SD 1.x/2.x and ``downscale`` 4 these are ``down_blocks.2`` and ``up_blocks.1``; derived
    from the UNet's own block count, never hard-coded. ``downscale`` 0 picks it with
    ``auto_downscale`` (``latent_px`` then defaults to the UNet's sample size).
    """
    if downscale == 0:
        downscale = auto_downscale(unet, latent_px or int(unet.config.sample_size))
    level = int(math.log2(downscale))
    if 2**level != downscale:
        raise UserError(f"loss.attn_loss_downscale must be a power of two (got {downscale}).")
    num_levels = len(unet.config.block_out_channels)
    names = [n for n in unet.attn_processors
             if n.endswith("attn2.processor") and _block_level(n, num_levels) == level]
    if not names:
        raise UserError(f"This UNet has no cross-attention layers at latent size / {downscale}; "
                        "set loss.attn_loss_downscale to a level that has them.")
    return names


def describe_loss_layers(unet: UNet2DConditionModel, downscale: int, latent_px: int) -> str:
    """Which maps the attention losses read, in one line: ``config.toml`` and ``lowmcgm estimate``
    state it, since with ``downscale`` 0 it is derived from the model (SDXL at 1024 px: 32x32)."""
    chosen = downscale or auto_downscale(unet, latent_px)
    names = loss_layer_names(unet, chosen, latent_px)
    blocks = sorted({name.split(".attentions.")[0] for name in names})
    how = "derived from the model" if downscale == 0 else "as set"
    side = latent_px // chosen
    return (f"the attention losses read {side}x{side} maps (latent side / {chosen}, {how}) of "
            f"{len(names)} cross-attention layers in {', '.join(blocks)}")


def install_capture(unet: UNet2DConditionModel, layers: list[str], store: CrossAttentionStore) -> dict:
    """Put capturing processors on ``layers`` only; return the processors they replaced."""
    current = dict(unet.attn_processors)
    previous = {name: current[name] for name in layers}
    for name in layers:
        current[name] = CapturingCrossAttnProcessor(store, name.removesuffix(".processor"))
    unet.set_attn_processor(current)
    return previous


def remove_capture(unet: UNet2DConditionModel, previous: dict) -> None:
    current = dict(unet.attn_processors)
    current.update(previous)
    unet.set_attn_processor(current)
