"""Attention layouts a traced estimate can use besides the trainer's own, for the memory benchmark's
ablations and its reference row (``tools/bench_memory.py``, the reference-code check in the tests).

``"sdpa"`` is the trainer as configured. The others swap attention processors after setup:
``explicit-self`` puts diffusers' explicit ``AttnProcessor`` on every self-attention layer;
``full-capture`` makes every cross-attention layer compute and keep its full softmax (the reference
code's P2P processor and AttentionStore); ``explicit`` does both (the reference code). Training never
uses them: only :func:`lowmcgm.memory.training_trace.trace_job` installs them, by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor

from lowmcgm.attention_capture import CapturingCrossAttnProcessor, CrossAttentionStore

ATTENTION_LAYOUTS = ("sdpa", "explicit-self", "full-capture", "explicit")


def install_attention_layout(setup: Any, layout: str) -> Any:
    """Swap attention processors after setup for the benchmark's ablations (``sdpa`` keeps the
    trainer's): ``explicit-self`` puts diffusers' explicit ``AttnProcessor`` on every self-attention
    layer; ``full-capture`` makes every cross-attention layer compute and keep its full softmax (all
    77 + K columns, as the reference's AttentionStore); ``explicit`` does both (the reference code).
    Returns the set-up to train with (with the new store where capture changed)."""
    if layout == "sdpa":
        return setup
    unet = setup.base.unet
    processors = dict(unet.attn_processors)
    loss_layers = {name for name, proc in processors.items() if isinstance(proc, CapturingCrossAttnProcessor)}
    if layout in ("explicit-self", "explicit"):
        processors.update({name: AttnProcessor() for name in processors if name.endswith("attn1.processor")})
    if layout in ("full-capture", "explicit"):
        store = KeepAllStore() if setup.store is not None else None
        for name in processors:
            if name.endswith("attn2.processor"):
                processors[name] = _FullSoftmaxCapture(store, name.removesuffix(".processor"), name in loss_layers)
        setup = dataclasses.replace(setup, store=store)
    unet.set_attn_processor(dict(processors))  # a copy: diffusers pops from the dict it gets
    return setup


class KeepAllStore(CrossAttentionStore):
    """The trainer's store, plus every cross-attention layer's full probabilities for the step."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[torch.Tensor] = []

    def begin(self, key_index: torch.Tensor) -> None:
        super().begin(key_index)
        self.kept = []


class _FullSoftmaxCapture:
    """diffusers' explicit attention on a cross-attention layer, keeping the whole (B*H, N, L)
    softmax for the step (the reference's P2P processor and AttentionStore); loss layers also record
    the handle and mask-token columns for the trainer's losses."""

    def __init__(self, store: KeepAllStore | None, layer: str, is_loss_layer: bool):
        self.store, self.layer, self.is_loss_layer = store, layer, is_loss_layer

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        batch, n, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*H, N, D)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B*H, L, D)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # (B*H, N, L)
        store = self.store
        if store is not None and store.key_index is not None:
            if store.recording:  # not during checkpoint recomputation, as the reference's store
                store.kept.append(probs)
            if self.is_loss_layer:  # in recomputation too: checkpointing needs the same graph
                per_head = probs.view(batch, attn.heads, n, -1)
                index = store.key_index.to(probs.device)[:, None, None, :].expand(
                    batch, attn.heads, n, store.key_index.shape[1])
                store.record(self.layer, torch.gather(per_head, -1, index).float())
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor
