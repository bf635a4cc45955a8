"""The trace session: what a traced function runs in, and the helpers it builds its models with.

A :class:`TraceSession` has a mode (``"fake"``: fake CUDA tensors on a CPU build with the shim loaded;
``"cuda"``: a real GPU; ``"cpu"``: real CPU tensors counted like fake ones), a device and a counter
(:mod:`lowmcgm.memory.counters`). Activating it installs the fake mode and its patches
(:mod:`lowmcgm.memory.fake_cuda`); the traced function reaches it through :func:`session`. Models are
built from their configs on the meta device (:func:`build_from_config`) and given device tensors of
their training dtypes (:func:`materialize_fake`). :func:`run_local` runs a function in a session in
this process; a fake session needs a fresh one (:func:`lowmcgm.memory.trace.run_traced`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from typing import Any, Callable, Iterator, Mapping

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

from lowmcgm.memory.counters import CudaMemoryCounter, LiveBytes
from lowmcgm.memory.fake_cuda import CpuStaysReal, fake_cuda_patches
from lowmcgm.memory.shim import shim_loaded, torch_is_gpu_build

# How a traced run may run: "auto" is real CUDA when a CUDA build of torch sees a GPU, else fake.
MODES = ("auto", "fake", "cuda", "cpu")


class TraceSession:
    """What a traced function sees through :func:`session`: the mode, the device and the counter.

    Attributes:
        mode: ``"fake"``, ``"cuda"`` or ``"cpu"``.
        device: ``torch.device("cuda")`` (fake or real) or ``torch.device("cpu")``.
        counter: :class:`LiveBytes` (fake, cpu) or :class:`CudaMemoryCounter` (cuda).
        fake_mode: the ``FakeTensorMode`` in fake mode, else None.
    """

    def __init__(self, mode: str, item_value: float = 0):
        if mode not in ("fake", "cuda", "cpu"):
            raise ValueError(f"session mode must be fake, cuda or cpu, not {mode!r}")
        self.mode = mode
        self.device = torch.device("cpu" if mode == "cpu" else "cuda")
        self.counter: LiveBytes | CudaMemoryCounter = (
            CudaMemoryCounter() if mode == "cuda" else LiveBytes(self.device.type))
        self.fake_mode: FakeTensorMode | None = None
        self.item_value = item_value
        self._cpu_mode: CpuStaysReal | None = None

    @property
    def is_fake(self) -> bool:
        return self.mode == "fake"

    def set_item_value(self, value: float) -> None:
        """What ``.item()`` of a fake tensor returns from now on (fake tensors hold no data: a
        check like ``torch.isfinite(loss)`` reads this value)."""
        self.item_value = value
        if self._cpu_mode is not None:
            self._cpu_mode.item_value = value

    def snapshot(self, label: str) -> dict:
        """Label the bytes live now (see :meth:`LiveBytes.snapshot`)."""
        return self.counter.snapshot(label)

    def reset_peak(self) -> None:
        self.counter.reset_peak()

    def materialize(self, module: torch.nn.Module,
                    dtype_for_param: Callable[[str, torch.nn.Parameter], torch.dtype | None] | None = None,
                    **kw: Any) -> torch.nn.Module:
        """:func:`materialize_fake` on this session's device."""
        return materialize_fake(module, dtype_for_param, self.device, **kw)

    def autocast(self, dtype: torch.dtype | None, enabled: bool = True):
        """``torch.autocast`` on this session's device type; a no-op for ``dtype`` None/float32."""
        if dtype is None or dtype == torch.float32 or not enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def outside_fake(self) -> Iterator[None]:
        """Leave the fake mode for a moment (e.g. to build a bitsandbytes optimizer, whose
        constructor reads tensor values). Tensors made here are real."""
        with unset_fake_temporarily():
            yield

    @contextlib.contextmanager
    def activate(self) -> Iterator[TraceSession]:
        """Make this the current session, with its modes and patches, for the ``with`` body."""
        global _CURRENT
        if _CURRENT is not None:
            raise RuntimeError("a trace session is already active in this process")
        _CURRENT = self
        try:
            with contextlib.ExitStack() as stack:
                if self.mode == "fake":
                    if not torch_is_gpu_build() and shim_loaded() is None:
                        raise RuntimeError(
                            "fake-CUDA tracing on a CPU build needs the shim loaded before torch: "
                            "use run_traced()")
                    self.fake_mode = stack.enter_context(
                        FakeTensorMode(allow_non_fake_inputs=True))
                    stack.enter_context(fake_cuda_patches(self.counter))  # type: ignore[arg-type]
                    self._cpu_mode = stack.enter_context(CpuStaysReal(self.item_value))
                stack.enter_context(self.counter)  # type: ignore[arg-type]
                yield self
        finally:
            _CURRENT = None
            self.fake_mode = None
            self._cpu_mode = None

    def report(self) -> dict:
        out = {"mode": self.mode, "device": self.device.type}
        out.update(self.counter.report())
        return out


_CURRENT: TraceSession | None = None


def session() -> TraceSession:
    """The trace session the calling code runs in (inside :func:`lowmcgm.memory.trace.run_traced` or
    :func:`measure_real_cpu`).

    Raises:
        RuntimeError: outside any session.
    """
    if _CURRENT is None:
        raise RuntimeError("no trace session is active: call this from a function run by "
                           "run_traced() or measure_real_cpu()")
    return _CURRENT


def current_session() -> TraceSession | None:
    """The active trace session, or None (for code that runs traced or not)."""
    return _CURRENT


def _fake_mode_active() -> bool:
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


@torch.no_grad()
def _init_real_(name: str, t: torch.Tensor, is_param: bool) -> None:
    if not t.is_floating_point() or not is_param or name.endswith("bias"):
        t.zero_()
    elif t.dim() <= 1:
        t.fill_(1.0)
    else:
        t.normal_(0.0, 0.02)


def materialize_fake(
    module: torch.nn.Module,
    dtype_for_param: Callable[[str, torch.nn.Parameter], torch.dtype | None] | None = None,
    device: torch.device | str | None = None,
    *,
    dtype_for_buffer: Callable[[str, torch.Tensor], torch.dtype | None] | None = None,
) -> torch.nn.Module:
    """Replace the parameters and buffers of ``module`` (typically on ``meta``) by tensors on
    ``device``, parameter by parameter, with the dtype each will have in training.

    Under a FakeTensorMode and a CUDA device the new tensors are fake (no memory): the way around
    "Cannot swap" when casting fake modules (trap 4). Otherwise (real CUDA or CPU runs) they are
    real, initialized with small random values (normal std 0.02 for matrices, ones for 1-d weights,
    zeros for biases and buffers) so that a step computes finite numbers.

    Args:
        module: the module; modified in place (``requires_grad`` and tied parameters kept).
        dtype_for_param: ``(qualified_name, parameter) -> dtype`` (None keeps the parameter's).
        device: default: the current session's device, else ``"cuda"``.
        dtype_for_buffer: the same for buffers (default: keep each buffer's dtype).

    Returns:
        ``module``.
    """
    if device is None:
        device = _CURRENT.device if _CURRENT is not None else "cuda"
    device = torch.device(device)
    fake = device.type == "cuda" and _fake_mode_active()
    new_for: dict[int, torch.Tensor] = {}  # tied parameters stay tied
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for kind, table in (("param", mod._parameters), ("buffer", mod._buffers)):
            for name, t in list(table.items()):
                if t is None:
                    continue
                if id(t) in new_for:
                    table[name] = new_for[id(t)]
                    continue
                full = f"{mod_name}.{name}" if mod_name else name
                chooser = dtype_for_param if kind == "param" else dtype_for_buffer
                dtype = (chooser(full, t) if chooser is not None else None) or t.dtype
                new = torch.empty(t.shape, dtype=dtype, device=device)
                if not fake:
                    _init_real_(full, new, kind == "param")
                if kind == "param":
                    new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                new_for[id(t)] = new
                table[name] = new
    return module


materialize = materialize_fake


def build_from_config(cls: type | str, config: Any, *, device: str = "meta",
                      **overrides: Any) -> torch.nn.Module:
    """Build a diffusers or transformers model from its config alone, on ``device`` (no weights).

    Args:
        cls: the model class (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``, ...)
            or ``"diffusers:UNet2DConditionModel"`` / ``"transformers:CLIPTextModel"``.
        config: a folder holding ``config.json``, the ``config.json`` path, a dict, or (for
            transformers) a config object.
        device: ``"meta"`` (default: instant, no memory) or any real device.
        **overrides: config entries to replace.

    Returns:
        The model, in float32, outside any fake mode (plain meta tensors).
    """
    if isinstance(cls, str):
        mod_name, _, cls_name = cls.partition(":")
        cls = getattr(importlib.import_module(mod_name), cls_name)
    with unset_fake_temporarily(), torch.device(device):
        if hasattr(cls, "from_config") and hasattr(cls, "load_config"):  # diffusers ConfigMixin
            cfg = dict(cls.load_config(config) if isinstance(config, (str, os.PathLike)) else config)
            cfg.update(overrides)
            return cls.from_config(cfg)
        config_class = getattr(cls, "config_class", None)
        if config_class is None:
            raise TypeError(f"{cls!r} is neither a diffusers nor a transformers model class")
        if isinstance(config, (str, os.PathLike)):
            cfg = config_class.from_pretrained(config)
        elif isinstance(config, Mapping):
            cfg = config_class.from_dict(dict(config))
        else:
            cfg = config
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cls(cfg)



def _resolve(fn_qualname: str) -> Callable:
    if ":" in fn_qualname:
        mod_name, attr = fn_qualname.split(":", 1)
    else:
        mod_name, _, attr = fn_qualname.rpartition(".")
    obj: Any = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def run_local(fn: Callable | str, kwargs: Mapping[str, Any] | None = None, *,
              mode: str = "cpu") -> dict:
    """Run ``fn(**kwargs)`` in this process inside a ``cpu`` or ``cuda`` session.

    Returns the same dict as :func:`lowmcgm.memory.trace.run_traced` (``result`` is what fn
    returned, unconverted). Fake mode needs a process that loaded the shim before torch: use
    ``run_traced``, whose subprocess (:mod:`lowmcgm.memory.child`) runs its function through here.
    """
    if mode == "fake" and shim_loaded() is None and not torch_is_gpu_build():
        raise RuntimeError("fake mode needs a fresh process: use run_traced()")
    func = _resolve(fn) if isinstance(fn, str) else fn
    sess = TraceSession(mode)
    start = time.perf_counter()
    with sess.activate():
        result = func(**dict(kwargs or {}))
    out = sess.report()
    out["wall_s"] = round(time.perf_counter() - start, 3)
    out["torch_version"] = torch.__version__
    out["result"] = result
    return out


def measure_real_cpu(fn: Callable | str, kwargs: Mapping[str, Any] | None = None) -> dict:
    """Run ``fn(**kwargs)`` for real on CPU, in this process, counting live CPU storage bytes with
    the same :class:`LiveBytes` counter as the fake runs (the estimator's self-check reference).

    Only tensors created during the call count (build the model inside ``fn``). Returns the same
    dict as :func:`lowmcgm.memory.trace.run_traced`.
    """
    return run_local(fn, kwargs, mode="cpu")

