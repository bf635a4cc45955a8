"""The accelerator contract: the real Accelerator and the estimator's stand-in both satisfy it, and
the training code calls nothing outside it."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from accelerate import Accelerator

from lowmcgm.memory.training_trace import TraceAccelerator
from lowmcgm.training.accelerator import ACCELERATOR_MEMBERS, AcceleratorLike

PACKAGE = Path(__file__).resolve().parents[1] / "lowmcgm"
# Modules that receive the trainer's accelerator (Setup.accelerator), and the names they give it.
USERS = ("training/trainer.py", "training/phases.py", "training/state.py", "training/checkpoints.py",
         "sampling/sampler.py", "training/prior.py", "interop/lora_import.py")
CALL = re.compile(r"\b(?:setup\.accelerator|self\.accelerator|accelerator|acc)\.([A-Za-z_]+)")


def test_real_and_stand_in_accelerators_satisfy_the_contract():
    for accelerator in (Accelerator(cpu=True), TraceAccelerator(torch.device("cpu"), "no")):
        assert isinstance(accelerator, AcceleratorLike), type(accelerator)
        missing = [name for name in ACCELERATOR_MEMBERS if not hasattr(accelerator, name)]
        assert not missing, (type(accelerator).__name__, missing)


def test_training_code_calls_only_what_the_contract_names():
    used = {}
    for name in USERS:
        for member in CALL.findall((PACKAGE / name).read_text()):
            used.setdefault(member, name)
    assert used, "the pattern found no accelerator use at all"
    outside = {member: where for member, where in used.items() if member not in ACCELERATOR_MEMBERS}
    assert not outside, f"add these to lowmcgm.training.accelerator.AcceleratorLike (and TraceAccelerator): {outside}"
