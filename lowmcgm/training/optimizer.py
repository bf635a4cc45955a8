"""Which AdamW trains: bitsandbytes' 8-bit one, trusted only once a test step ran, or torch's.

Recent bitsandbytes imports where its CUDA library is missing or the card is unsupported, and fails
only at the first ``step()``: ``choose_optimizer`` runs one step on a small parameter (the trainer
calls it before weights load) and falls back to torch AdamW with a one-line message, or refuses when
``train.use_adamw_fallback`` is off. The optimizer a run trains with is recorded in its checkpoints: the two keep different states
(``resume`` refuses to load one into the other). Building the optimizer is the trainer's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lowmcgm.config import TrainConfig
from lowmcgm.errors import UserError

ADAMW8BIT, ADAMW = "adamw8bit", "adamw"  # the values of train.optimizer
OPTIMIZER_TITLES = {ADAMW8BIT: "bitsandbytes' 8-bit AdamW", ADAMW: "torch AdamW"}
# bitsandbytes keeps 32-bit state for tensors under 4096 elements (``min_8bit_size`` of its
# Optimizer8bit): the probe's parameter is that large, so its step runs the 8-bit kernel training runs.
PROBE_NUMEL = 4096


def choose_optimizer(t: TrainConfig, device: torch.device, say: Callable[[str], None]) -> str:
    """The optimizer a run on ``device`` trains with: ``t.optimizer``, or ``adamw`` where 8-bit cannot run.

    Args:
        t: the train section (``optimizer``, ``use_adamw_fallback``).
        device: where training runs; 8-bit is probed there.
        say: receives the one-line fallback message.

    Raises:
        UserError: 8-bit cannot run here and ``t.use_adamw_fallback`` is off.
    """
    if t.optimizer != ADAMW8BIT:
        return t.optimizer
    problem = "it needs a CUDA device" if device.type != "cuda" else probe_adamw8bit(device)
    if problem is None:
        return ADAMW8BIT
    if not t.use_adamw_fallback:
        raise UserError(f"train.optimizer = 'adamw8bit' cannot run here ({problem}) and train.use_adamw_fallback "
                        "is off: fix bitsandbytes' CUDA install, or allow torch AdamW with "
                        "--set train.use_adamw_fallback=true.")
    if device.type != "cuda":  # the usual case on a CPU: said as before
        say("bitsandbytes' 8-bit AdamW needs a CUDA device: using torch AdamW.")
    else:
        say(f"bitsandbytes' 8-bit AdamW failed its test step ({problem}): using torch AdamW, whose fp32 moments "
            "take up to 4x the optimizer memory.")
    return ADAMW


def probe_adamw8bit(device: torch.device) -> str | None:
    """Run one bitsandbytes AdamW8bit step on a small parameter on ``device``.

    Returns:
        None when the step ran and moved the parameter, else what went wrong, in a few words.
    """
    try:
        import bitsandbytes as bnb

        param = torch.nn.Parameter(torch.ones(PROBE_NUMEL, device=device))
        param.grad = torch.full_like(param, 0.5)
        bnb.optim.AdamW8bit([param], lr=1e-2).step()
        moved = bool(((param < 1) & torch.isfinite(param)).all())  # the sync: a failed kernel raises here
    except Exception as exc:  # bitsandbytes fails in many ways on unsupported systems
        return _first_line(exc)
    return None if moved else "the step left the parameter unchanged or not finite"


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class of ``name`` (``adamw8bit``: only once ``choose_optimizer`` chose it)."""
    if name == ADAMW8BIT:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit
    return torch.optim.AdamW


def optimizer_of_state(state: dict[str, Any]) -> str | None:
    """Which optimizer wrote ``state`` (a state dict), from its keys: bitsandbytes keeps ``state1``
    (and ``qmap1``, ``absmax1``), torch AdamW ``exp_avg``; None before the first step."""
    for values in state["state"].values():
        if "state1" in values:
            return ADAMW8BIT
        if "exp_avg" in values:
            return ADAMW
    return None


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
