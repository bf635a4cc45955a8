"""lowmcgm.adapters: frozen weights stored in fp8 (``model.fp8_base``) under LoRA."""

from __future__ import annotations

import copy

import pytest
import torch

from lowmcgm.adapters import add_lora, store_in_fp8
from lowmcgm.config import resolve_config
from lowmcgm.errors import UserError
from lowmcgm.models.tiny import build_tiny_base


def _unet_inputs(unet):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=gen)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    return latents, torch.tensor([500]), context


def test_fp8_storage_computes_with_the_scaled_rounded_weights():
    unet = build_tiny_base("tiny").unet.requires_grad_(False)
    rounded = copy.deepcopy(unet)
    for module in rounded.modules():  # what fp8 storage keeps of each weight, read back in fp32
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            scale = module.weight.abs().max() / 448
            module.weight.data = (module.weight.data / scale).to(torch.float8_e4m3fn).float() * scale
    store_in_fp8(unet, torch.float32)
    to_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
    assert to_q.parametrizations.weight.original.dtype == torch.float8_e4m3fn
    assert to_q.weight.dtype == torch.float32 and unet.conv_in.parametrizations.weight.original.element_size() == 1
    # The largest weight is stored as fp8's largest value, so the scale is a fraction of it.
    assert to_q.parametrizations.weight.original.float().abs().max() == 448
    assert to_q.parametrizations.weight[0].scale.dtype == torch.float32
    with torch.no_grad():
        got = unet(*_unet_inputs(unet)).sample
        want = rounded(*_unet_inputs(rounded)).sample
    assert torch.equal(got, want)
    # Norms keep their dtype: only Linear and Conv2d weights are stored in fp8.
    assert unet.down_blocks[0].attentions[0].norm.weight.dtype == torch.float32


@pytest.mark.parametrize("std", [0.01, 0.005], ids=["std-0.01", "std-0.005"])
def test_fp8_scale_keeps_small_weights(std):
    # The case: a plain cast of N(0, std) weights loses 6-11 % and zeroes 8-16 % of them.
    weight = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * std
    layer = torch.nn.Linear(1024, 256, bias=False).requires_grad_(False)
    layer.weight.data = weight.clone()
    store_in_fp8(layer, torch.float32)
    plain = weight.to(torch.float8_e4m3fn).float()
    assert (plain - weight).norm() / weight.norm() > 0.05 and (plain == 0).float().mean() > 0.07
    assert (layer.weight - weight).norm() / weight.norm() < 0.03 and not (layer.weight == 0).any()


def test_fp8_scale_stays_fp32_and_moves_with_the_module():
    from lowmcgm.adapters import cast_keeping_fp8

    unet = build_tiny_base("tiny").unet.requires_grad_(False)
    store_in_fp8(unet, torch.float32)
    cast_keeping_fp8(unet, torch.float16)  # as sampling casts the base
    to_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
    assert to_q.parametrizations.weight[0].scale.dtype == torch.float32 and to_q.weight.dtype == torch.float16
    assert "parametrizations.weight.0.scale" in to_q.state_dict()
    unet.to("meta")
    assert to_q.parametrizations.weight[0].scale.is_meta


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
