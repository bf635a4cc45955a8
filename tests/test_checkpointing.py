"""Gradient checkpointing for training (``lowmcgm.training.checkpointing``): one-block attention
modules recomputed whole, as kohya's U-Net does, with the same gradients and less kept."""

from __future__ import annotations

import copy

import torch
from diffusers import Transformer2DModel

from lowmcgm.memory.saved_activations import SavedActivations
from lowmcgm.models.tiny import build_tiny_base
from lowmcgm.training.checkpointing import checkpoint_unet


def _step(unet, seed=0):
    """One loss and its gradients; returns (loss, {name: grad}, bytes saved for backward by model part)."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 32, 32, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    saved = SavedActivations({"unet": unet}, device_type="cpu")
    with saved:
        out = unet(sample, torch.tensor([10, 500]), context).sample
        loss = out.float().pow(2).mean()
        saved.recording = False
    loss.backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    return loss.detach(), grads, saved


def test_one_block_attention_modules_are_recomputed_whole_with_the_same_gradients_and_less_kept():
    plain = build_tiny_base("tiny").unet.train()
    diffusers_ckpt = copy.deepcopy(plain)
    diffusers_ckpt.enable_gradient_checkpointing()
    whole = copy.deepcopy(plain)
    one_block = [m for m in whole.modules() if isinstance(m, Transformer2DModel)]
    assert checkpoint_unet(whole) == len(one_block) > 0  # tiny (SD 1.5 shrunk): every module has one block

    loss0, grads0, kept0 = _step(plain)
    loss1, grads1, kept1 = _step(diffusers_ckpt)
    loss2, grads2, kept2 = _step(whole)
    assert torch.equal(loss0, loss2) and grads0.keys() == grads2.keys()
    for name in grads0:
        torch.testing.assert_close(grads2[name], grads0[name], rtol=1e-5, atol=1e-6)
    total = [sum(k.by_module.values()) for k in (kept0, kept1, kept2)]
    assert total[2] < total[1] < total[0], total
    # What diffusers' own checkpointing leaves inside an attention module (its norm, projections) is
    # gone: only the checkpoint's inputs are kept, under the module itself.
    inner = [sorted({name for name in k.by_module if ".attentions." in name and
                     not name.endswith(tuple(f".attentions.{i}" for i in range(4)))}) for k in (kept1, kept2)]
    assert inner[1] == [] and any(name.endswith(".norm") for name in inner[0]), inner


def test_modules_with_several_blocks_keep_per_block_checkpoints_and_eval_runs_unchanged():
    base = build_tiny_base("tiny-xl")  # SDXL shrunk: one level with one block, one with two
    unet = base.unet
    before = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    several = [m for m in before if len(m.transformer_blocks) > 1]
    assert several and len(several) < len(before)
    whole = checkpoint_unet(unet)
    assert whole == len(before) - len(several)
    assert all(m.gradient_checkpointing for m in several)  # diffusers' per-block checkpoints stay
    assert not any(m.gradient_checkpointing for m in before if m not in several)

    # In eval mode (sampling) a wrapped module runs its forward as it is: no checkpoint.
    module = next(m for m in before if m not in several)
    unet.eval()
    calls = []
    original = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        x = torch.randn(1, module.config.in_channels, 8, 8, requires_grad=True)
        ctx = torch.randn(1, 5, module.config.cross_attention_dim)
        module(x, encoder_hidden_states=ctx)
        assert calls == []
        unet.train()
        module(x, encoder_hidden_states=ctx)
        assert calls == [1]
        # A second call (a recipe set up twice on one UNet) does not nest a checkpoint in another.
        assert checkpoint_unet(unet) == whole
        module(x, encoder_hidden_states=ctx)
        assert calls == [1, 1]
    finally:
        torch.utils.checkpoint.checkpoint = original
