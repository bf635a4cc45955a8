"""lowmcgm.adapters: frozen weights stored in fp8 (``model.fp8_base``) under LoRA."""

from __future__ import annotations

import copy

import pytest
import torch

from lowmcgm.adapters import add_lora, store_in_fp8
from lowmcgm.config import resolve_config
from lowmcgm.errors import UserError
from lowmcgm.models import build_tiny_base


def _unet_inputs(unet):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=gen)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    return latents, torch.tensor([500]), context


def test_fp8_storage_computes_with_the_rounded_weights():
    unet = build_tiny_base("tiny").unet.requires_grad_(False)
    rounded = copy.deepcopy(unet)
    for module in rounded.modules():  # what fp8 storage keeps of each weight, read back in fp32
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn).float()
    store_in_fp8(unet, torch.float32)
    to_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
    assert to_q.parametrizations.weight.original.dtype == torch.float8_e4m3fn
    assert to_q.weight.dtype == torch.float32 and unet.conv_in.parametrizations.weight.original.element_size() == 1
    with torch.no_grad():
        got = unet(*_unet_inputs(unet)).sample
        want = rounded(*_unet_inputs(rounded)).sample
    assert torch.equal(got, want)
    # Norms keep their dtype: only Linear and Conv2d weights are stored in fp8.
    assert unet.down_blocks[0].attentions[0].norm.weight.dtype == torch.float32


def test_lora_on_fp8_layers_trains_in_fp32_and_gradients_reach_it():
    unet = build_tiny_base("tiny").unet.requires_grad_(False)
    store_in_fp8(unet, torch.float32)
    params = add_lora(unet, ("to_q", "to_k", "to_v", "to_out.0"), rank=4, alpha=4.0)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    with torch.no_grad():
        for p in params:
            p.add_(0.01)  # non-zero up-projections, so every LoRA weight gets a gradient
    unet(*_unet_inputs(unet)).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    frozen = [p for p in unet.parameters() if p.dtype == torch.float8_e4m3fn]
    assert frozen and all(p.grad is None for p in frozen)


def test_fp8_base_cannot_go_with_a_full_fine_tune():
    with pytest.raises(UserError, match="model.fp8_base stores frozen weights in fp8"):
        resolve_config("tiny-cpu", None, {"model.fp8_base": True, "lora.phase2_mode": "full"})
