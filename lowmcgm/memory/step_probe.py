"""Where a traced training step's peak goes: :class:`StepProbe` follows the steps (which part of the
step runs, the bytes at its boundaries, the gradients so far, where the peak was reached) and
:func:`peak_parts` splits the peak into frozen and trainable weights, optimizer state, gradients,
kept activations and the transient rest.

Shared by lowmcgm's own trace (:mod:`lowmcgm.memory.training_trace`) and the peers' steps
(:mod:`lowmcgm.memory.peers`), so that both sides of the side-by-side table are itemised by the same
rule.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowmcgm.memory import trace as mt


class StepProbe(TorchDispatchMode):
    """Follows training steps under the live-bytes counter.

    A dispatch mode above the counter: after every op it checks whether the peak rose and, if so,
    notes the step, the part of it and the gradient bytes live then. Gradients are counted by
    post-accumulate hooks on the trainable parameters (O(1) per gradient). The trainer's accelerator
    calls :meth:`forward_begins` (at autocast), :meth:`forward_done` and :meth:`backward_done`
    (around backward); the optimizer's step hooks call :meth:`enter`.
    """

    def __init__(self, counter: Any, params: list[torch.nn.Parameter]):
        super().__init__()
        self.counter = counter
        self.window = "between steps"
        self.steps: list[dict[str, int]] = []
        self.grad_bytes = 0
        self._seen: set[int] = set()
        self.best = -1
        self.at_peak: dict[str, Any] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_done) for p in params]

    def _grad_done(self, param: torch.nn.Parameter) -> None:
        if id(param) not in self._seen and param.grad is not None:
            self._seen.add(id(param))
            self.grad_bytes += mt.storage_bytes([param.grad])

    def begin_step(self, optimizer_state_bytes: int) -> None:
        self.grad_bytes, self._seen = 0, set()
        self.steps.append({"start": self.counter.current, "optimizer_state": optimizer_state_bytes,
                           "activations": 0, "gradients": 0})

    def enter(self, window: str) -> None:
        self.window = window

    def forward_begins(self) -> None:
        # Several autocast regions in one step (text encoder, then UNet) start one forward.
        if self.window != "forward":
            self.window = "forward"
            self.steps[-1]["start"] = self.counter.current  # the batch was built before

    def forward_done(self) -> None:
        self.steps[-1]["activations"] = self.counter.current - self.steps[-1]["start"]
        self.window = "backward"

    def backward_done(self) -> None:
        self.steps[-1]["gradients"] = self.grad_bytes
        self.window = "clip"

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> list[Any]:
        """Hooks that mark the optimizer's step and what follows it; the caller removes them."""
        return [optimizer.register_step_pre_hook(lambda *a: self.enter("optimizer step")),
                optimizer.register_step_post_hook(lambda *a: self.enter("zero_grad"))]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.counter.peak > self.best:
            self.best = self.counter.peak
            self.at_peak = {"step": len(self.steps) - 1, "window": self.window, "gradients": self.grad_bytes}
        return out

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, device_type: str) -> int:
    """Optimizer state on the device (torch AdamW keeps its ``step`` counters on the CPU)."""
    return mt.storage_bytes(t for state in optimizer.state.values() for t in tree_leaves(state)
                            if isinstance(t, torch.Tensor) and t.device.type == device_type)


# The parts :func:`peak_parts` splits a step's peak into, in order, with the short names tables give them.
PART_NAMES = {"frozen_weights": "frozen weights", "trainable_weights": "trainable weights",
              "optimizer_state": "optimizer state", "other_resident": "other resident", "gradients": "gradients",
              "activations": "kept activations", "transient": "transient (at the peak)"}


def peak_parts(probe: StepProbe, peak: int, baseline: int, modules: Iterable[torch.nn.Module],
               params: list[torch.nn.Parameter], device_type: str) -> dict[str, Any]:
    """The peak (bytes above ``baseline``) split into parts, with where it was reached.

    Args:
        probe: the probe that followed the steps.
        peak: the steps' peak, relative to ``baseline``.
        modules: every model whose weights may be on the device (frozen: what is not in ``params``).
        params: the trainable parameters.

    Returns:
        ``parts`` (frozen_weights, trainable_weights, optimizer_state, other_resident, gradients,
        activations, transient: they add up to ``peak``), ``peak_during`` (the step's window) and the
        largest gradients and kept activations of any step.
    """
    at = probe.at_peak or {"step": len(probe.steps) - 1, "window": "between steps", "gradients": 0}
    step = probe.steps[at["step"]]
    trainable = {id(p) for p in params}
    frozen = [t for m in modules for t in list(m.parameters()) + list(m.buffers())
              if id(t) not in trainable and t.device.type == device_type]
    frozen_bytes, trainable_bytes = mt.storage_bytes(frozen), mt.storage_bytes(params)
    resident = step["start"] - baseline  # everything live when the step began
    rest = peak - resident - at["gradients"]
    # Kept activations are all live at the end of forward and die during backward: attribute to
    # them what they can hold of the rest; after backward they are gone.
    activations = min(step["activations"], rest) if at["window"] in ("forward", "backward", "clip") else 0
    parts = {"frozen_weights": frozen_bytes, "trainable_weights": trainable_bytes,
             "optimizer_state": step["optimizer_state"],
             "other_resident": resident - frozen_bytes - trainable_bytes - step["optimizer_state"],
             "gradients": at["gradients"], "activations": activations, "transient": rest - activations}
    return {"parts": parts, "peak_during": at["window"],
            "gradients_total_bytes": max(st["gradients"] for st in probe.steps),
            "activations_kept_bytes": max(st["activations"] for st in probe.steps),
            "frozen_params": sum(t.numel() for t in frozen if t.is_floating_point())}
