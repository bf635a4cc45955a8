"""Floating-point operations of one training step, counted on the memory tracer's fake tensors and
itemised: forward, backward and checkpoint recomputation; per part of the model; the attention
capture and the losses apart (``tools/bench_flops.py``, docs/benchmarks.md, "Compute per step").

What counts is torch's own :mod:`torch.utils.flop_counter` registry (the formulas of
``FlopCounterMode``: matrix products, convolutions and attention kernels, forward and backward),
which needs shapes only, so fake tensors do. Everything else (normalisations, activations, softmax
outside attention kernels, the losses' arithmetic, the optimizer) is not in that registry; it is
counted beside it as *element operations*: one per floating-point output element of every other op,
a rough measure of memory-bound work, reported apart and never added to the FLOPs.

:class:`FlopCount` is a context manager that attributes each op to

- a **window**: ``forward`` (outside the autograd engine: the optimizer's step and gradient
  clipping fall here too, element operations only); ``backward`` (the autograd engine runs a node:
  ``torch._C._current_autograd_node()``); ``recompute`` (a module's forward runs inside the backward:
  gradient checkpointing recomputing a block);
- a **part**: the outermost model the op runs in (:data:`PARTS`, by class name, so lowmcgm's
  diffusers UNet and kohya's own UNet class are both ``unet``), or a tagged function when one runs:
  ``attention capture`` (``attention_capture.compute_selected_probs`` and the store's ``record`` and
  ``mean_maps``: the work the capture adds to the stock SDPA processor) or ``losses`` (the loss
  functions of :mod:`lowmcgm.losses` as the training step calls them (``training.step``), and ``F.mse_loss``: the prior loss
  and kohya's); ``AutoencoderKL.encode``/``decode`` are tagged ``vae`` (called as methods, they pass
  no module hook). In the backward, an op belongs to the part whose forward made the autograd node it
  runs in (nodes are recorded as the forward makes them, by a ``TorchFunctionMode``).

The tagged functions are replaced for the duration of the ``with`` block and put back after it (the
tracer's own patches of torch work the same way, :mod:`lowmcgm.memory.fake_cuda`).

Traced entry points (run by :func:`lowmcgm.memory.trace.run_traced`): :func:`count_jobs` (lowmcgm's
training step per phase, set up by the trainer's own ``prepare_setup``), :func:`count_kohya` (kohya's
``train_network.py`` step of :mod:`lowmcgm.memory.peers`), :func:`count_kohya_sdxl` (its
``sdxl_train_network.py`` step of :mod:`lowmcgm.memory.kohya_sdxl`) and :func:`count_sampling` (one denoising
step per pose-guidance mode, :mod:`lowmcgm.memory.sampling`).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections import defaultdict
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

WINDOWS = ("forward", "recompute", "backward")
# The outermost module of these classes names the part an op runs in.
PARTS = {
    "UNet2DConditionModel": "unet",  # diffusers', and kohya's library/original_unet.py class
    "SdxlUNet2DConditionModel": "unet",  # kohya's SDXL class
    "CLIPTextModel": "text encoder",
    "CLIPTextModelWithProjection": "text encoder",
    "AutoencoderKL": "vae",
    "MaskEncoder": "mask encoder",
}
CAPTURE, LOSSES, OTHER = "attention capture", "losses", "other"
# Ops that do no arithmetic (views, copies, metadata, fills): not element operations.
_NO_WORK = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "squeeze", "unsqueeze",
            "slice", "select", "as_strided", "detach", "alias", "clone", "copy_", "_to_copy", "empty", "empty_like",
            "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like", "zero_", "fill_", "ones",
            "ones_like", "full", "full_like", "new_zeros", "new_ones", "lift_fresh", "split", "split_with_sizes",
            "unbind", "cat", "stack", "index", "gather", "index_select", "embedding", "_local_scalar_dense",
            "arange", "randn", "rand", "randint", "normal_", "uniform_", "bernoulli_", "_reshape_alias",
            "contiguous", "set_", "resize_", "constant_pad_nd", "repeat", "_has_compatible_shallow_copy_type",
            "copy", "diagonal", "narrow", "unfold", "flip", "roll", "where", "masked_fill", "scatter"}


class FlopCount:
    """Counts matrix-class FLOPs and element operations by window and part while active.

    Args:
        device_type: count only ops that touch a tensor of this device type (``"cuda"`` in a fake
            session: the CPU-side data preparation is not the GPU's work); None counts every op.

    Example:
        >>> with FlopCount("cuda") as count:
        ...     train_step(setup, state)
        >>> count.flops("backward"), count.table()
    """

    def __init__(self, device_type: str | None = None):
        self.device_type = device_type
        self.counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])  # (window, part) -> [flops, elem]
        self._local = threading.local()
        self._node_part: dict[Any, str] = {}
        self._stack = contextlib.ExitStack()

    # ---------------------------------------------------------------- what the figures are
    def flops(self, window: str | None = None, part: str | None = None) -> int:
        """Matrix-class FLOPs of ``window`` and ``part`` (None: all of them)."""
        return sum(c[0] for (w, p), c in self.counts.items() if window in (None, w) and part in (None, p))

    def element_ops(self, window: str | None = None, part: str | None = None) -> int:
        """Element operations (module docstring) of ``window`` and ``part``."""
        return sum(c[1] for (w, p), c in self.counts.items() if window in (None, w) and part in (None, p))

    def table(self) -> dict[str, dict[str, dict[str, int]]]:
        """``{window: {part: {"flops": n, "element_ops": m}}}``, JSON-able."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (window, part), (flops, elem) in sorted(self.counts.items()):
            out.setdefault(window, {})[part] = {"flops": flops, "element_ops": elem}
        return out

    # ---------------------------------------------------------------- attribution state
    def _state(self) -> threading.local:
        local = self._local
        if not hasattr(local, "modules"):
            local.modules, local.tags = [], []
        return local

    def _part_now(self) -> str:
        st = self._state()
        if st.tags:
            return st.tags[-1]
        return next((p for p in st.modules if p is not None), OTHER)

    def _window_now(self) -> str:
        if torch._C._current_autograd_node() is None:
            return "forward"
        return "recompute" if self._state().modules else "backward"

    def _where(self) -> tuple[str, str]:
        window = self._window_now()
        if window == "backward":
            return window, self._node_part.get(torch._C._current_autograd_node(), OTHER)
        if window == "recompute" and not self._state().tags:
            # The engine's thread recomputes a block without the model around it on its module
            # stack: the node whose saved tensors it recomputes says which part it is.
            return window, self._node_part.get(torch._C._current_autograd_node(), OTHER)
        return window, self._part_now()

    def _record_nodes(self, node: Any, part: str) -> None:
        """Attribute ``node`` and the nodes before it not yet attributed to ``part`` (a composite
        function, ``F.linear`` on 3-d input, makes several; its output holds the last)."""
        todo = [node]
        while todo:
            node = todo.pop()
            if node is None or node in self._node_part:
                continue
            self._node_part[node] = part
            todo.extend(next_node for next_node, _ in node.next_functions)

    def _touches_device(self, leaves: list[Any]) -> bool:
        if self.device_type is None:
            return True
        return any(isinstance(x, torch.Tensor) and x.device.type == self.device_type for x in leaves)

    def _add(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        packet = func._overloadpacket
        leaves = tree_leaves((args, kwargs, out))
        if not self._touches_device(leaves):
            return
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
            elem = 0
        else:
            if packet.__name__ in _NO_WORK:
                return
            flops = 0
            elem = sum(t.numel() for t in tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.is_floating_point())
        if flops or elem:
            cell = self.counts[self._where()]
            cell[0] += flops
            cell[1] += elem

    # ---------------------------------------------------------------- hooks and tags
    def _pre_hook(self, module: torch.nn.Module, args: Any) -> None:
        self._state().modules.append(PARTS.get(type(module).__name__))

    def _post_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        modules = self._state().modules
        if modules and torch.is_grad_enabled() and self._window_now() == "recompute":
            # A reentrant checkpoint's recomputation makes the nodes its backward runs through, unseen
            # by _NodeRecorder (no torch function mode there): the recomputed node's part.
            for t in tree_leaves(output):
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    self._record_nodes(t.grad_fn, self._where()[1])
        if modules:  # always_call: also when the forward raised (checkpointing's early stop does)
            modules.pop()

    def tagged(self, fn: Callable, part: str) -> Callable:
        """``fn`` with its work attributed to ``part`` (and the autograd nodes it makes too)."""
        def run(*args: Any, **kwargs: Any) -> Any:
            tags = self._state().tags
            tags.append(part)
            try:
                return fn(*args, **kwargs)
            finally:
                tags.pop()
        run.__wrapped__ = fn  # type: ignore[attr-defined]
        return run

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name)
        setattr(obj, name, value)
        self._stack.callback(setattr, obj, name, old)

    def _install_tags(self) -> None:
        import torch.nn.functional as F
        from diffusers import AutoencoderKL

        from lowmcgm import attention_capture
        from lowmcgm.attention_capture import CrossAttentionStore
        from lowmcgm.training import step

        self._patch(attention_capture, "compute_selected_probs",
                    self.tagged(attention_capture.compute_selected_probs, CAPTURE))
        for name in ("record", "mean_maps"):
            self._patch(CrossAttentionStore, name, self.tagged(getattr(CrossAttentionStore, name), CAPTURE))
        for name in ("compute_masked_diffusion_loss", "compute_attention_loss", "compute_total_loss"):
            self._patch(step, name, self.tagged(getattr(step, name), LOSSES))
        self._patch(F, "mse_loss", self.tagged(F.mse_loss, LOSSES))
        # The VAE is used through its methods, not its forward: no module hook sees it.
        for name in ("encode", "decode"):
            self._patch(AutoencoderKL, name, self.tagged(getattr(AutoencoderKL, name), "vae"))

    def __enter__(self) -> FlopCount:
        from torch.nn.modules import module as nn_module

        stack = self._stack
        stack.enter_context(_NodeRecorder(self))
        stack.enter_context(_OpCounter(self))
        for handle in (nn_module.register_module_forward_pre_hook(self._pre_hook),
                       nn_module.register_module_forward_hook(self._post_hook, always_call=True)):
            stack.callback(handle.remove)
        self._install_tags()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._node_part = {}


class _OpCounter(TorchDispatchMode):
    """Every dispatched op, after it ran, to :meth:`FlopCount._add`."""

    def __init__(self, count: FlopCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.count._add(func, args, kwargs, out)
        return out


class _NodeRecorder(TorchFunctionMode):
    """Notes the part each autograd node was made in (forward and recomputation), so that its
    backward is attributed to that part."""

    def __init__(self, count: FlopCount):
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            for t in tree_leaves(out):
                node = t.grad_fn if isinstance(t, torch.Tensor) else None
                if node is not None and node not in self.count._node_part:
                    self.count._record_nodes(node, self.count._part_now())
        return out


# ------------------------------------------------------------------------------- summaries


def summarize(count: FlopCount) -> dict[str, Any]:
    """The figures a table needs: FLOPs per window, per part (every window), the itemised parts."""
    return {
        "total_flops": count.flops(),
        "windows": {w: count.flops(w) for w in WINDOWS},
        "parts": {p: count.flops(part=p) for p in sorted({p for _, p in count.counts})},
        "capture_flops": count.flops(part=CAPTURE),
        "losses_flops": count.flops(part=LOSSES),
        "capture_element_ops": count.element_ops(part=CAPTURE),
        "losses_element_ops": count.element_ops(part=LOSSES),
        "element_ops": count.element_ops(),
        "table": count.table(),
    }


# ------------------------------------------------------------------------------- traced side


def count_jobs(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Traced: :func:`count_job` for each job (``lowmcgm.memory.estimate.build_job``'s dicts)."""
    out = []
    for job in jobs:
        out.append(count_job(**{k: v for k, v in job.items() if k != "label"}))
        gc.collect()
    return out


def count_job(config: dict[str, Any], model: str, attention: str = "sdpa", num_concepts: int = 2) -> dict[str, Any]:
    """Traced: prepare ``model`` for ``config`` with the trainer's code (as ``lowmcgm estimate``),
    then count one step of each phase that has steps (``TrainingRecipe.step``, as training runs it).

    Returns:
        ``{"resolution", "notes", "phases": [{"phase", "trainable_params", **summarize(...)}]}``.
    """
    from lowmcgm.memory import trace as mt
    from lowmcgm.memory.training_trace import build_traced_setup
    from lowmcgm.training.recipe import TrainingRecipe

    s = mt.session()
    cfg, setup, notes = build_traced_setup(config, model, attention, num_concepts)
    recipe, phases = TrainingRecipe(setup), []
    for phase in (1, 2):
        if (cfg.train.phase1_steps if phase == 1 else cfg.train.phase2_steps) == 0:
            continue
        state = recipe.enter_phase(phase)
        with FlopCount(s.device.type) as count:
            recipe.step()
        params = [p for group in state.optimizer.param_groups for p in group["params"]]
        phases.append({"phase": phase, "trainable_params": sum(p.numel() for p in params), **summarize(count)})
    return {"resolution": setup.concept.image.shape[-1], "phases": phases, "notes": notes}


def count_kohya(kohya: str, runs: list[dict[str, int]]) -> list[dict[str, Any]]:
    """Traced: kohya's ``train_network.py`` step (:func:`lowmcgm.memory.peers.kohya_step`), one per
    ``{"rank", "resolution", "batch_size"}``. Its setup (latents cached by the VAE) is counted too,
    as the part ``vae``, and reported apart from the step."""
    from lowmcgm.memory import trace as mt
    from lowmcgm.memory.peers import kohya_step

    s = mt.session()
    out = []
    for run in runs:
        with FlopCount(s.device.type) as count:
            res = kohya_step(kohya, run["rank"], run["resolution"], steps=1, batch_size=run["batch_size"])
        setup_flops = count.flops("forward", "vae")
        for key in [k for k in count.counts if k[1] == "vae"]:
            del count.counts[key]
        out.append({**run, **summarize(count), "setup_flops": setup_flops, "trainable_params": res["trainable_params"],
                    "lora_modules": res["lora_modules"], "flags": res["flags"], "notes": res["notes"]})
        gc.collect()
    return out


def count_kohya_sdxl(kohya: str, runs: list[dict[str, int]]) -> list[dict[str, Any]]:
    """Traced: kohya's ``sdxl_train_network.py`` step (:func:`lowmcgm.memory.kohya_sdxl.kohya_sdxl_step`,
    ``--fp8_base`` off: it changes no FLOP count), one per ``{"rank", "resolution"}``. Its setup (latents
    cached by the VAE, text-encoder outputs cached by both text encoders and kohya's pooled-output
    projection outside them) is everything before the loop's first ``StepProbe.begin_step``: counted
    apart, as ``setup_flops`` with its ``latent_caching_flops`` (part ``vae``) and
    ``text_encoder_caching_flops`` (the rest), and not in the step's figures."""
    from lowmcgm.memory import trace as mt
    from lowmcgm.memory.kohya_sdxl import kohya_sdxl_step
    from lowmcgm.memory.step_probe import StepProbe

    s = mt.session()
    out = []
    for run in runs:
        setup: dict[str, Any] = {}
        with FlopCount(s.device.type) as count:
            def begin_step(probe: StepProbe, *args: Any, _begin: Callable = StepProbe.begin_step, **kwargs: Any) -> Any:
                if not setup:  # the first step begins: what was counted so far is the setup
                    setup.update(flops=count.flops(), vae=count.flops(part="vae"), table=count.table())
                    count.counts.clear()
                return _begin(probe, *args, **kwargs)

            count._patch(StepProbe, "begin_step", begin_step)
            res = kohya_sdxl_step(kohya, run["rank"], False, run["resolution"], steps=1)
        out.append({**run, **summarize(count), "setup_flops": setup["flops"], "latent_caching_flops": setup["vae"],
                    "text_encoder_caching_flops": setup["flops"] - setup["vae"], "setup_table": setup["table"],
                    "trainable_params": res["trainable_params"], "lora_modules": res["lora_modules"],
                    "flags": res["flags"], "notes": res["notes"]})
        gc.collect()
    return out


def count_sampling(model: str, resolution: int, modes: list[str], fp8_unet: bool = False) -> list[dict[str, Any]]:
    """Traced: :func:`lowmcgm.memory.sampling.sampling_step` (one classifier-free denoising step of
    each pose-guidance mode, then the VAE decode), counted: the step is the ``unet`` part (and the
    capture), the decode the ``vae`` part."""
    from lowmcgm.memory import trace as mt
    from lowmcgm.memory.sampling import sampling_step

    s = mt.session()
    out = []
    for mode in modes:
        with FlopCount(s.device.type) as count:
            sampling_step(model, resolution, mode, "fp16", fp8_unet=fp8_unet)
        decode = count.flops(part="vae")
        out.append({"mode": mode, "step_flops": count.flops() - decode, "decode_flops": decode, **summarize(count)})
        gc.collect()
    return out

