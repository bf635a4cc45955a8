"""``lowmcgm.memory.saved_activations``: what autograd keeps for backward, by the module that kept it."""

from __future__ import annotations

import torch

from lowmcgm.memory.saved_activations import SavedActivations


def test_saved_inputs_are_counted_by_module_and_weights_are_left_out():
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(64, 16, requires_grad=True)
    saved = SavedActivations({"net": net}, device_type="cpu")
    with saved:
        loss = net(x).pow(2).sum()
        saved.recording = False
        loss.backward()  # nothing more is counted once recording stops
    by = dict(saved.by_module)
    # Linear 0 keeps its input x (64x16 fp32); ReLU its output (64x32), which linear 1 shares as its
    # input (one storage, counted once, for the first module that saved it); linear 1's weight is left out.
    assert by["net.0"] == 64 * 16 * 4
    assert by["net.1"] == 64 * 32 * 4
    assert "net.2" not in by
    assert by["(outside the models)"] == 64 * 8 * 4  # the loss's pow keeps the network's output
    assert saved.grouped(1) == {"net": 64 * 16 * 4 + 64 * 32 * 4, "(outside the models)": 64 * 8 * 4}


def test_a_checkpointed_module_keeps_only_its_input():
    inner = torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.GELU(), torch.nn.Linear(256, 16))
    x = torch.randn(32, 16, requires_grad=True)
    plain = SavedActivations({"inner": inner}, device_type="cpu")
    with plain:
        inner(x).sum().backward()
    ckpt = SavedActivations({"inner": inner}, device_type="cpu")
    with ckpt:
        out = torch.utils.checkpoint.checkpoint(inner, x, use_reentrant=False)
        ckpt.recording = False
        out.sum().backward()
    assert sum(ckpt.by_module.values()) <= x.numel() * 4 < sum(plain.by_module.values())
