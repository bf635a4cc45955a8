"""What autograd keeps for the backward pass, by the module that kept it: the "activations" part of
a traced step's peak, itemised, so that two trainers' steps can be compared module by module
(``tools/bench_memory.py --kohya``'s itemised difference).

:class:`SavedActivations` is a context manager around a forward pass: autograd's saved-tensor hooks
see every tensor an op saves for its backward (with non-reentrant gradient checkpointing, only what
the checkpoint keeps: its inputs, since the checkpoint's own hooks take the inside), and global module
hooks say which module was running. Each storage counts once, for the first module that saved it;
the models' own weights (a linear layer saves its weight) are left out: they are resident anyway.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Any

import torch

from lowmcgm.memory import trace as mt


class SavedActivations:
    """Bytes saved for backward per module name while the context is open.

    Args:
        roots: name -> model; a saved tensor is put under the qualified name of the innermost
            running module of these models ("root.sub.layer"), or "(outside the models)".
        device_type: only storages on this device count.
    """

    def __init__(self, roots: dict[str, torch.nn.Module], device_type: str = "cuda"):
        self.names = {id(m): (f"{root}.{name}" if name else root)
                      for root, model in roots.items() for name, m in model.named_modules()}
        self.device_type = device_type
        # Weights saved for backward (a linear layer keeps its weight) are resident anyway: not activations.
        self._weights = {id(t.untyped_storage()) for model in roots.values()
                         for t in [*model.parameters(), *model.buffers()] if t.device.type == device_type}
        self.by_module: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._seen: dict[int, weakref.ref] = {}
        self._handles: list[Any] = []
        self._hooks: Any = None
        self.recording = True  # set False at backward: a reentrant checkpoint's recompute saves again

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        name = self.names.get(id(module))
        self._stack.append(name if name is not None else (self._stack[-1] if self._stack else ""))

    def _post(self, module: torch.nn.Module, args: Any, out: Any) -> None:
        if self._stack:
            self._stack.pop()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.recording and t.device.type == self.device_type:
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                return t
            key = id(st)
            if key in self._weights:
                return t
            ref = self._seen.get(key)
            if ref is None or ref() is None:
                self._seen[key] = weakref.ref(st) if _weakrefable(st) else (lambda: st)
                where = self._stack[-1] if self._stack and self._stack[-1] else "(outside the models)"
                self.by_module[where] += mt.storage_bytes([t])
        return t

    def __enter__(self) -> "SavedActivations":
        self._handles = [torch.nn.modules.module.register_module_forward_pre_hook(self._pre),
                         torch.nn.modules.module.register_module_forward_hook(self._post, always_call=True)]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    def grouped(self, depth: int) -> dict[str, int]:
        """The bytes by the first ``depth`` parts of the module names, largest first."""
        out: dict[str, int] = defaultdict(int)
        for name, n in self.by_module.items():
            out[".".join(name.split(".")[:depth])] += n
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _weakrefable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False


def lowmcgm_saved(config: dict[str, Any], model: str, phase: int = 2) -> dict[str, Any]:
    """Traceable: what lowmcgm's step of ``phase`` saves for backward, by module (its second step)."""
    import gc

    from lowmcgm.memory.training_trace import build_traced_setup
    from lowmcgm.training.recipe import TrainingRecipe

    s = mt.session()
    _, setup, _ = build_traced_setup(config, model)
    recipe = TrainingRecipe(setup)
    for p in range(1, phase + 1):
        recipe.enter_phase(p)
    recipe.step()
    gc.collect()
    base, mcgm = setup.base, setup.mcgm
    roots = {"unet": base.unet, **{f"text_encoder{i or ''}": te for i, te in enumerate(base.text_encoders)}}
    if mcgm.mask_encoder is not None:
        roots["mask_encoder"] = mcgm.mask_encoder
    saved = SavedActivations(roots, s.device.type)
    backward = setup.accelerator.backward

    def stop_then_backward(loss: torch.Tensor) -> None:
        saved.recording = False
        backward(loss)

    setup.accelerator.backward = stop_then_backward
    with saved:
        recipe.step()
    return {"by_module": dict(saved.by_module)}


def trace_saved(job: dict[str, Any], phase: int = 2, timeout_s: float = 1800.0) -> dict[str, Any]:
    """:func:`lowmcgm_saved` for an estimate job (``memory.estimate.build_job``), in a tracing subprocess."""
    out = mt.run_traced("lowmcgm.memory.saved_activations:lowmcgm_saved",
                        {"config": job["config"], "model": job["model"], "phase": phase}, timeout_s, mode="fake")
    return out["result"]
