"""The capturing processor: same output as diffusers, exact maps, correct gradients under checkpointing."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from lowmcgm.attention_capture import (CrossAttentionStore, compute_map_grid, compute_selected_probs, install_capture,
                                       loss_layer_names, remove_capture)
from lowmcgm.errors import UserError
from lowmcgm.models.configs import config_folder
from lowmcgm.models.tiny import build_tiny_base

SD15_UNET = UNet2DConditionModel.load_config(config_folder("sd15") / "unet")  # the real layout


def _inputs(unet, batch=2, keys=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, 4, size, size, generator=g)
    context = torch.randn(batch, keys, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 500][:batch])
    return latents, t, context


def _tiny_unet():
    unet = build_tiny_base("tiny").unet.eval()
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def test_loss_layers_of_sd15_are_the_quarter_resolution_cross_attentions():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SD15_UNET)
    names = loss_layer_names(unet, 4)
    assert names and all(n.endswith("attn2.processor") for n in names)
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in names} == {"down_blocks.2", "up_blocks.1"}
    assert len(names) == 2 + 3  # layers_per_block attentions down, layers_per_block + 1 up
    assert not any(n.startswith("mid_block") for n in names)


def test_loss_layers_follow_the_downscale_setting():
    unet = _tiny_unet()
    assert {n.split(".attentions")[0] for n in loss_layer_names(unet, 2)} == {"down_blocks.1", "up_blocks.2"}
    with pytest.raises(UserError, match="power of two"):
        loss_layer_names(unet, 3)
    with pytest.raises(UserError, match="no cross-attention layers"):
        loss_layer_names(unet, 8)  # level 3 holds only DownBlock2D/UpBlock2D


def test_output_equals_stock_processor():
    unet = _tiny_unet()
    latents, t, context = _inputs(unet)
    with torch.no_grad():
        expected = unet(latents, t, context).sample
        store = CrossAttentionStore()
        previous = install_capture(unet, loss_layer_names(unet, 4), store)
        store.begin(torch.tensor([[1, 77, 78], [3, 77, 79]]))
        got = unet(latents, t, context).sample
        store.end()
        remove_capture(unet, previous)
        again = unet(latents, t, context).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    assert set(store.maps) == {n.removesuffix(".processor") for n in loss_layer_names(unet, 4)}


class _ExplicitStore(AttnProcessor):
    """diffusers' explicit-softmax processor, keeping the full probabilities as the reference does."""

    def __init__(self, sink, name):
        super().__init__()
        self.sink, self.name = sink, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # (B*H, N, L)
        self.sink[self.name] = probs.reshape(-1, attn.heads, *probs.shape[1:])
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_captured_maps_equal_explicit_full_softmax():
    unet = _tiny_unet()
    latents, t, context = _inputs(unet)
    names = loss_layer_names(unet, 4)
    full: dict[str, torch.Tensor] = {}
    procs = dict(unet.attn_processors)
    for n in names:
        procs[n] = _ExplicitStore(full, n.removesuffix(".processor"))
    unet.set_attn_processor(procs)
    with torch.no_grad():
        unet(latents, t, context)
    unet.set_attn_processor(AttnProcessor2_0())
    key_index = torch.tensor([[5, 77, 79], [2, 78, 77]])
    store = CrossAttentionStore()
    install_capture(unet, names, store)
    store.begin(key_index)
    with torch.no_grad():
        unet(latents, t, context)
    store.end()
    for layer, probs in full.items():  # (B, H, N, L)
        expected = torch.stack([probs[b, :, :, key_index[b]] for b in range(2)]).mean(1)  # (B, N, S)
        torch.testing.assert_close(store.maps[layer], expected, rtol=1e-4, atol=1e-6)


def test_selected_probs_match_softmax_columns():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    idx = torch.tensor([[0, 6], [3, 3]])
    full = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1)
    got = compute_selected_probs(q, k, idx, 0.5)
    torch.testing.assert_close(got[0], full[0][..., [0, 6]])
    torch.testing.assert_close(got[1], full[1][..., [3, 3]])


def _handle_grad(checkpointing: bool):
    unet = build_tiny_base("tiny").unet
    unet.requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    store = CrossAttentionStore()
    install_capture(unet, loss_layer_names(unet, 4), store)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    latents, t, context = _inputs(unet, batch=1)
    handle = torch.nn.Parameter(torch.randn(unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(3)))
    ctx = torch.cat([context[:, :4], handle[None, None], context[:, 5:]], 1)

    calls = {"n": 0}
    original = store.record

    def counting(layer, probs):
        calls["n"] += 1
        original(layer, probs)
    store.record = counting
    store.begin(torch.tensor([[4, 6]]))
    unet(latents, t, ctx)
    store.end()
    captured = dict(store.maps)
    maps = store.mean_maps()
    loss = ((maps[:, 0] / maps[:, 0].amax() - 0.5) ** 2).mean()
    loss.backward()
    return handle.grad.clone(), captured, calls["n"]


def test_attention_gradient_is_the_same_with_gradient_checkpointing():
    grad_plain, maps_plain, calls_plain = _handle_grad(checkpointing=False)
    grad_ckpt, maps_ckpt, calls_ckpt = _handle_grad(checkpointing=True)
    assert grad_plain.abs().sum() > 0
    torch.testing.assert_close(grad_ckpt, grad_plain, rtol=1e-5, atol=1e-7)
    assert maps_ckpt.keys() == maps_plain.keys()
    # Recomputation in backward calls the processor again but stores nothing a second time.
    assert calls_plain == len(maps_plain)
    assert calls_ckpt == 2 * len(maps_ckpt)


def test_store_refuses_a_second_capture_of_one_layer():
    store = CrossAttentionStore()
    store.begin(torch.zeros(1, 1, dtype=torch.long))
    store.record("x", torch.zeros(1, 1, 4, 1))
    with pytest.raises(RuntimeError, match="twice"):
        store.record("x", torch.zeros(1, 1, 4, 1))


def test_auto_downscale_aims_for_16px_maps():
    from lowmcgm.attention_capture import auto_downscale
    with torch.device("meta"):
        sd15 = UNet2DConditionModel.from_config(SD15_UNET)
    assert auto_downscale(sd15, 64) == 4  # 512 px: 16x16 maps, the paper's layers
    assert auto_downscale(sd15, 96) == 4  # 768 px: 24x24 (the 12x12 level has no cross-attention)
    assert auto_downscale(_tiny_unet(), 32) == 2  # tiny: 16x16 rather than 8x8
    assert loss_layer_names(sd15, 0, 64) == loss_layer_names(sd15, 4)


MAP_GRIDS = {
    "square, no size (training)": (256, None, (16, 16)),
    "landscape image": (16 * 24, (64, 96), (16, 24)),
    "its latent": (16 * 24, (32, 48), (16, 24)),
    "portrait, coarser layer": (6 * 4, (96, 64), (6, 4)),
    "odd latent sides round up (520x776 px)": (33 * 49, (520, 776), (33, 49)),
    "odd latent sides, two levels down": (17 * 25, (65, 97), (17, 25)),
    "square image off the 8 px grid": (36, (100, 100), (6, 6)),
    "image off the grid: nearest aspect": (54, (100, 150), (6, 9)),
}


@pytest.mark.parametrize("case", MAP_GRIDS.values(), ids=MAP_GRIDS.keys())
def test_map_grid_follows_the_image_aspect(case):
    num_queries, size, grid = case
    assert compute_map_grid(num_queries, size) == grid


def test_mean_maps_of_a_non_square_latent_have_its_aspect_and_layout():
    """The tiny UNet on a 9x13 latent (odd sides: the UNet rounds up) captures 3x4 maps at its
    latent / 4 layers; a probability recorded at one query lands at that query's row and column."""
    unet = _tiny_unet()
    store = CrossAttentionStore()
    install_capture(unet, loss_layer_names(unet, 4), store)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 9, 13, generator=g)
    context = torch.randn(1, 80, unet.config.cross_attention_dim, generator=g)
    store.begin(torch.tensor([[4, 6]]))
    with torch.no_grad():
        unet(latents, torch.tensor([10]), context)
    store.end()
    assert store.mean_maps(latents.shape[-2:]).shape == (1, 2, 3, 4)
    store.maps = {"x": torch.zeros(1, 12, 2)}
    store.maps["x"][0, 1 * 4 + 3, 1] = 1.0  # row 1, column 3 of a 3x4 map, row-major as diffusers flattens
    maps = store.mean_maps((9, 13))
    assert maps[0, 1, 1, 3] == 1.0 and maps.sum() == 1.0
