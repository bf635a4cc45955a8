"""lowmcgm.training.optimizer: 8-bit AdamW is trusted only after a test step; otherwise torch AdamW or a refusal."""

from __future__ import annotations

import pytest
import torch

from lowmcgm.config import TrainConfig
from lowmcgm.errors import UserError
from lowmcgm.training import optimizer
from lowmcgm.training.optimizer import choose_optimizer, optimizer_of_state, probe_adamw8bit

CUDA = torch.device("cuda")  # never touched: the probe is replaced in these tests
BROKEN = "RuntimeError: CUDA Setup failed: libbitsandbytes_cuda124.so not found"


def _choose(monkeypatch, probe_says, device=CUDA, **train):
    said = []
    monkeypatch.setattr(optimizer, "probe_adamw8bit", lambda device: probe_says)
    return choose_optimizer(TrainConfig(**train), device, said.append), said


def test_8bit_that_passes_its_test_step_is_used(monkeypatch):
    assert _choose(monkeypatch, None) == ("adamw8bit", [])


def test_8bit_that_fails_its_test_step_falls_back_with_one_line(monkeypatch):
    name, said = _choose(monkeypatch, BROKEN)
    assert name == "adamw"
    assert said == [f"bitsandbytes' 8-bit AdamW failed its test step ({BROKEN}): using torch AdamW, whose fp32 "
                    "moments take up to 4x the optimizer memory."]


def test_8bit_that_fails_is_refused_when_required(monkeypatch):
    with pytest.raises(UserError, match=r"cannot run here \(RuntimeError: CUDA Setup failed.*use_adamw_fallback=true"):
        _choose(monkeypatch, BROKEN, use_adamw_fallback=False)


def test_without_cuda_the_usual_message_and_no_probe(monkeypatch):
    name, said = _choose(monkeypatch, "never asked", device=torch.device("cpu"))
    assert name == "adamw" and said == ["bitsandbytes' 8-bit AdamW needs a CUDA device: using torch AdamW."]
    with pytest.raises(UserError, match=r"cannot run here \(it needs a CUDA device\)"):
        _choose(monkeypatch, None, device=torch.device("cpu"), use_adamw_fallback=False)


def test_torch_adamw_is_not_probed(monkeypatch):
    assert _choose(monkeypatch, "never asked", optimizer="adamw", use_adamw_fallback=False) == ("adamw", [])


@pytest.mark.parametrize("step,expected", [
    ("raises", "RuntimeError: CUDA error: no kernel image is available for execution on the device"),
    ("does nothing", "the step left the parameter unchanged or not finite"),
], ids=["step-raises", "step-does-nothing"])
def test_probe_reports_a_failing_step_in_one_line(monkeypatch, step, expected):
    bnb = pytest.importorskip("bitsandbytes")

    def broken_step(self, closure=None):
        if step == "raises":
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device\n"
                               "CUDA kernel errors might be asynchronously reported")

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", broken_step)
    assert probe_adamw8bit(torch.device("cpu")) == expected


def test_optimizer_of_state_reads_the_state_keys():
    param = torch.nn.Parameter(torch.ones(3))
    adamw = torch.optim.AdamW([param])
    assert optimizer_of_state(adamw.state_dict()) is None  # no step yet: nothing to convert
    param.grad = torch.ones(3)
    adamw.step()
    assert optimizer_of_state(adamw.state_dict()) == "adamw"
    eight_bit = {"state": {0: {"step": 1, "state1": torch.zeros(3, dtype=torch.uint8), "qmap1": torch.zeros(256)}},
                 "param_groups": []}
    assert optimizer_of_state(eight_bit) == "adamw8bit"
