"""Peak GPU memory of arbitrary PyTorch code, measured without a GPU (fake CUDA tensors) or with one.

The machinery behind ``lowmcgm estimate``: run a Python function, typically "one training step on
models built from their configs", and count the bytes it keeps live on the accelerator.

Three ways to run the same function (the *mode* of a :class:`TraceSession`):

- ``"fake"``: CPU-only torch. Every CUDA tensor is a ``FakeTensor`` (shapes, dtypes, no data), so an
  SD-size step costs seconds and no memory. Needs the C++ shim ``fake_cuda_guard.cpp`` (compiled
  once into the cache, see :func:`ensure_shim`) loaded *before* ``import torch``: that is why it
  runs in a subprocess of its own (:func:`run_traced`). The counter is :class:`LiveBytes`.
- ``"cuda"``: a CUDA build of torch on a machine with a GPU. The function runs for real and the
  figures come from ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``
  (:class:`CudaMemoryCounter`). This path is written but was not run where it was written (no GPU).
- ``"cpu"``: real CPU tensors counted by the same :class:`LiveBytes` (``device_type="cpu"``): the
  reference the fake figures are checked against on a tiny model (:func:`measure_real_cpu`).

Writing a traceable function::

    from lowmcgm.memory import trace as mt

    def my_step(resolution: int = 512) -> dict:
        s = mt.session()                                  # mode, device, counter
        unet = mt.build_from_config(UNet2DConditionModel, folder / "unet")   # on the meta device
        unet.requires_grad_(False)
        ...inject adapters (still on meta)...
        mt.materialize_fake(unet, lambda name, p: torch.float32 if p.requires_grad else torch.float16)
        s.snapshot("weights")
        ...forward / backward / optimizer step on s.device...
        s.snapshot("step")
        return {"anything": "JSON-able"}

    out = mt.run_traced("mypackage.mymodule:my_step", {"resolution": 512}, timeout_s=300)
    out["peak_bytes"], out["snapshots"], out["result"]

Inside a fake session, CPU-side work (data preparation, ``torch.randint(...).item()``, masks) runs
for real; only CUDA tensors are fake. ``.item()`` of a fake CUDA tensor returns 0 (there is no
data): a traced function must not branch on data it computed on the device. ``Module.to()``,
``.half()``, ``.to_empty()`` and peft's ``add_adapter`` work on fake modules (the swap that torch
refuses is made possible, see ``_patch_swap_tensors``). ``torch.cuda.max_memory_allocated()`` and
friends report the fake counter. A torch ``Generator`` on ``cuda`` cannot be created: draw on CPU
and move, or pass no generator.

Caveats of the fake figures: they are what ``max_memory_allocated`` would report (live storages
rounded to 512 B), not counting kernel-internal workspaces (cuBLAS/cuDNN, up to ~100 MiB), the
CUDA context (0.3-0.6 GiB) and the caching allocator's slack (``max_memory_reserved`` is 5-20 %
higher). Attention takes the kernel a real GPU would pick (flash for fp16/bf16 and head dim
<= 256 without a mask, memory-efficient otherwise), never the math kernel. bitsandbytes kernels do
not run under fake tensors: account for them analytically.

This module imports torch at import time, except when it runs as a script or with
``python -m lowmcgm.memory.trace``: then it loads the shim first and hands over to the imported
module (so traced functions and the session share one module instance).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

# ----------------------------------------------------------------------------------------------
# Part 1: standard library only (runs before torch is imported in the tracing subprocess).
# ----------------------------------------------------------------------------------------------

__all__ = [
    "MODES", "SHIM_SOURCE", "TraceError", "ShimBuildError", "cache_dir", "torch_is_gpu_build",
    "ensure_shim", "load_shim", "run_traced", "run_local", "measure_real_cpu", "session",
    "current_session", "TraceSession", "LiveBytes", "CudaMemoryCounter", "storage_bytes",
    "materialize_fake", "materialize", "build_from_config", "fake_cuda_patches",
    "unet_lora_step", "trace_unet_lora_step", "tiny_unet_step", "TINY_UNET_CONFIG",
]

SHIM_SOURCE = Path(__file__).resolve().with_name("fake_cuda_guard.cpp")
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
_SHIM_LOADED: str | None = None  # path of the loaded shim, in the process that loaded it

MODES = ("auto", "fake", "cuda", "cpu")


class TraceError(RuntimeError):
    """A traced run failed: the subprocess raised, crashed or ran out of time.

    Attributes:
        child_traceback: the traceback printed by the subprocess, when it got that far.
        stderr_tail: the last lines of its standard error.
    """

    def __init__(self, message: str, child_traceback: str = "", stderr_tail: str = ""):
        super().__init__(message)
        self.child_traceback = child_traceback
        self.stderr_tail = stderr_tail


class ShimBuildError(TraceError):
    """The fake-CUDA shim could not be compiled (no g++, or torch headers missing)."""


def cache_dir() -> Path:
    """Where the compiled shim is kept: ``$LOWMCGM_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowmcgm``,
    else ``~/.cache/lowmcgm``."""
    if os.environ.get("LOWMCGM_CACHE_DIR"):
        return Path(os.environ["LOWMCGM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowmcgm"


def _torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise ShimBuildError("torch is not installed in this Python")
    return Path(spec.origin).resolve().parent


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # source build without metadata
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", (_torch_dir() / "version.py").read_text())
        return m.group(1) if m else "unknown"


def torch_is_gpu_build() -> bool:
    """Whether the installed torch was built with CUDA or ROCm, read without importing torch."""
    if "torch" in sys.modules:
        import torch  # noqa: PLC0415  (already imported: free)

        return bool(torch.version.cuda or torch.version.hip)
    text = (_torch_dir() / "version.py").read_text()
    for key in ("cuda", "hip"):
        m = re.search(rf"^{key}\s*(?::[^=\n]*)?=\s*(.+)$", text, re.MULTILINE)
        if m and m.group(1).strip() not in ("None", "''", '""'):
            return True
    return False


def _cxx11_abi() -> int:
    if "torch" in sys.modules:
        import torch  # noqa: PLC0415

        return int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return 1  # every torch wheel since 2.7 uses the new ABI


def ensure_shim(verbose: bool = False) -> Path:
    """Compile ``fake_cuda_guard.cpp`` against the installed torch, once, and return the ``.so``.

    The library is cached in :func:`cache_dir` under a name keyed by the torch version and a hash of
    the source, torch's location, the Python version and the C++ ABI; compiling takes 3-10 s and
    needs ``g++`` (``$CXX`` overrides). Safe to call from several processes at once (the result is
    moved into place atomically). Does not import torch.

    Raises:
        ShimBuildError: when there is no compiler or the compilation fails.
    """
    torch_dir = _torch_dir()
    source = SHIM_SOURCE.read_bytes()
    abi = _cxx11_abi()
    key = hashlib.sha256(
        source + f"|{torch_dir}|{_torch_version()}|{sys.version_info[:2]}|{abi}".encode()
    ).hexdigest()[:12]
    version = re.sub(r"[^A-Za-z0-9.+_-]", "_", _torch_version())
    name = f"fake_cuda_guard-torch{version}-{key}.so"
    out = cache_dir() / name
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(out.parent)
    except OSError:  # read-only home: fall back to a per-user temporary folder
        out = Path(tempfile.gettempdir()) / f"lowmcgm-{os.getuid()}" / name
        if out.exists():
            return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise ShimBuildError(
            "fake-CUDA tracing needs a C++ compiler (g++) to build its shim once; install g++ "
            "or set CXX"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-O1", "-std=c++20", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           f"-I{torch_dir}/include", str(SHIM_SOURCE), f"-L{torch_dir}/lib", "-lc10",
           "-ltorch_cpu", f"-Wl,-rpath,{torch_dir}/lib", "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ShimBuildError(
                "compiling the fake-CUDA shim failed:\n" + " ".join(cmd) + "\n" + proc.stderr[-4000:],
                stderr_tail=proc.stderr[-4000:],
            )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if verbose:
        print(f"compiled {out}", file=sys.stderr)
    return out


def load_shim(path: str | os.PathLike | None = None) -> str:
    """Load the shim into this process (compiling it first if needed). Must precede ``import torch``.

    Raises:
        RuntimeError: when torch is already imported (the CUDA hooks are cached at import time, and
            a late shim leaves backward aborting the process).
    """
    global _SHIM_LOADED
    path = str(path or ensure_shim())
    if _SHIM_LOADED == path:
        return path
    if "torch" in sys.modules:
        raise RuntimeError(
            "the fake-CUDA shim must be loaded before torch is imported; run the traced code "
            "through run_traced() (a fresh subprocess). If this is `python -m "
            "lowmcgm.memory.trace`, something imported torch first (lowmcgm/__init__.py?)"
        )
    ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    _SHIM_LOADED = path
    return path


def _child_pythonpath() -> str:
    """PYTHONPATH for the subprocess: lowmcgm's root, then what this process can import that a
    fresh interpreter would not find (pytest's rootdir inserts, sys.path edits), then $PYTHONPATH."""
    skip = {os.path.realpath(p) for p in sysconfig.get_paths().values() if p}
    entries = [str(_PACKAGE_ROOT)]
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        rp = os.path.realpath(p)
        if rp in skip or "site-packages" in rp or "dist-packages" in rp or rp.endswith("lib-dynload"):
            continue
        entries.append(rp)
    if os.environ.get("PYTHONPATH"):
        entries.append(os.environ["PYTHONPATH"])
    seen: list[str] = []
    for e in entries:
        if e not in seen:
            seen.append(e)
    return os.pathsep.join(seen)


def run_traced(
    fn_qualname: str,
    kwargs: Mapping[str, Any] | None = None,
    timeout_s: float = 600.0,
    *,
    mode: str = "auto",
    env: Mapping[str, str] | None = None,
    python: str | None = None,
) -> dict:
    """Run ``fn(**kwargs)`` in a fresh subprocess inside a trace session and return its figures.

    Args:
        fn_qualname: ``"package.module:function"`` (or ``"package.module.function"``); a nested
            name after the colon (``"module:Class.method"``) is resolved attribute by attribute.
            The function takes the JSON kwargs, may call :func:`session` for the device and the
            counter, and returns something JSON-serializable (or None).
        kwargs: JSON-serializable keyword arguments.
        timeout_s: the subprocess is killed (whole process group) after this many seconds.
        mode: ``"auto"`` (real CUDA when a CUDA build of torch sees a GPU, else fake), ``"fake"``,
            ``"cuda"`` or ``"cpu"`` (real CPU tensors, counted like fake ones).
        env: extra environment variables for the subprocess.
        python: the interpreter (default: this one).

    Returns:
        ``{"result": <what fn returned>, "mode": "fake"|"cuda"|"cpu", "device": "cuda"|"cpu",
        "peak_bytes": int, "current_bytes": int, "snapshots": [...], "wall_s": float,
        "torch_version": str}``, plus ``"peak_reserved_bytes"`` in cuda mode. ``peak_bytes`` is
        the peak over the whole call (weights included), as ``max_memory_allocated`` reports it.

    Raises:
        TraceError: the function raised (its traceback is in ``child_traceback``), the process
            died, or it ran past ``timeout_s``.
        ShimBuildError: fake mode, and the shim cannot be compiled.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    shim = None
    if mode in ("auto", "fake") and not torch_is_gpu_build():
        shim = ensure_shim()
    with tempfile.TemporaryDirectory(prefix="lowmcgm-trace-") as tmp:
        kw_path, out_path = os.path.join(tmp, "kwargs.json"), os.path.join(tmp, "out.json")
        with open(kw_path, "w") as f:
            json.dump(dict(kwargs or {}), f)
        cmd = [python or sys.executable, str(Path(__file__).resolve()), "--fn", fn_qualname,
               "--kwargs", kw_path, "--out", out_path, "--mode", mode]
        if shim:
            cmd += ["--shim", str(shim)]
        child_env = dict(os.environ)
        child_env["PYTHONPATH"] = _child_pythonpath()
        child_env.update(env or {})
        err_path = os.path.join(tmp, "stderr.txt")
        start = time.monotonic()
        with open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=child_env,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise TraceError(
                    f"traced run of {fn_qualname} timed out after {timeout_s:.0f} s",
                    stderr_tail=_tail(err_path),
                ) from None
        wall = time.monotonic() - start
        payload = None
        if os.path.exists(out_path):
            with open(out_path) as f:
                payload = json.load(f)
        if rc != 0 or payload is None or "error" in payload:
            tb = (payload or {}).get("traceback", "")
            msg = (payload or {}).get("error") or f"the tracing subprocess exited with code {rc}"
            if rc < 0:
                msg += f" (killed by signal {-rc})"
            last = [line for line in _tail(err_path).splitlines() if line.strip()][-1:]
            if not tb and last:  # a crash leaves no traceback: its last word on stderr says why
                msg += f"; its stderr ended with: {last[0].strip()}"
            raise TraceError(f"traced run of {fn_qualname} failed: {msg}", child_traceback=tb,
                             stderr_tail=_tail(err_path))
        payload["subprocess_wall_s"] = round(wall, 3)
        return payload


def _tail(path: str, n: int = 6000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def _preload_for_child(argv: list[str]) -> None:
    """Subprocess bootstrap: put the package on sys.path and load the shim if fake mode needs it."""
    here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != here]  # script-mode entry
    if str(_PACKAGE_ROOT) not in sys.path:
        sys.path.insert(0, str(_PACKAGE_ROOT))
    mode = argv[argv.index("--mode") + 1] if "--mode" in argv else "auto"
    shim = argv[argv.index("--shim") + 1] if "--shim" in argv else None
    if mode in ("auto", "fake") and not torch_is_gpu_build():
        load_shim(shim)


if __name__ == "__main__":
    _preload_for_child(sys.argv[1:])
    import lowmcgm.memory.trace as _real_module  # noqa: E402  (imports torch, after the shim)

    _real_module._SHIM_LOADED = _SHIM_LOADED
    code = _real_module._child_main(sys.argv[1:])
    # The result is written; leave without the interpreter's teardown. Tearing down torch's
    # autograd worker thread of the fake CUDA device sometimes ends in std::terminate ("terminate
    # called without an active exception", SIGABRT) on a loaded machine, which would turn a good
    # trace into a failure (measured: 1 run in 3 with both cores busy).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------------------------
# Part 2: torch.
# ----------------------------------------------------------------------------------------------

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from lowmcgm.dtypes import torch_dtype  # noqa: E402

_ORIG_SDPA = F.scaled_dot_product_attention
_ORIG_SWAP = torch.utils.swap_tensors


def _round_up(n: int, granularity: int) -> int:
    return int(math.ceil(n / granularity) * granularity) if granularity > 1 else int(n)


def storage_bytes(tensors: Iterable[Any], granularity: int = 512) -> int:
    """Bytes of the distinct storages behind ``tensors`` (modules are expanded to their parameters
    and buffers; None entries are skipped), each rounded up to ``granularity``."""
    seen: set[int] = set()
    total = 0
    for t in _iter_tensors(tensors):
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if id(st) in seen:
            continue
        seen.add(id(st))
        total += _round_up(st.nbytes(), granularity)
    return total


def _iter_tensors(items: Any) -> Iterator[torch.Tensor]:
    if isinstance(items, torch.Tensor):
        yield items
        return
    if isinstance(items, torch.nn.Module):
        yield from items.parameters()
        yield from items.buffers()
        return
    if isinstance(items, torch.optim.Optimizer):
        for state in items.state.values():
            yield from (v for v in tree_leaves(state) if isinstance(v, torch.Tensor))
        return
    if isinstance(items, Mapping):
        items = items.values()
    for x in items:
        if x is not None:
            yield from _iter_tensors(x)


class LiveBytes(TorchDispatchMode):
    """Live storage bytes on one device type and their peak: what ``max_memory_allocated`` reports.

    A dispatch mode: every tensor an aten op returns is looked at; a storage not seen before on
    ``device_type`` is added (its size rounded up to ``granularity``, 512 B like the CUDA caching
    allocator) and a weak reference subtracts it when it dies. Views and aliases share a storage and
    count once. Tensors that existed before the mode was entered are invisible unless given to
    :meth:`track`. Allocations inside kernels (workspaces) are not seen.

    Use as a context manager; read ``current``, ``peak``, ``snapshots``.
    """

    def __init__(self, device_type: str = "cuda", granularity: int = 512):
        super().__init__()
        self.device_type = device_type
        self.granularity = granularity
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self.current = 0
        self.peak = 0
        self._window_peak = 0
        self.snapshots: list[dict] = []

    # -- counting
    def track(self, *items: Any) -> int:
        """Count tensors made before the mode was entered (modules: parameters and buffers).
        Returns the bytes newly added."""
        before = self.current
        for t in _iter_tensors(items):
            self._add(t)
        return self.current - before

    def _add(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (sparse, nested, some subclasses)
            return
        key = id(st)
        if key in self._live:
            return
        size = _round_up(st.nbytes(), self.granularity)

        def release(_ref, key=key, self_ref=weakref.ref(self)):
            me = self_ref()
            if me is not None:
                entry = me._live.pop(key, None)
                if entry is not None:
                    me.current -= entry[0]

        self._live[key] = (size, weakref.ref(st, release))
        self.current += size
        if self.current > self.peak:
            self.peak = self.current
        if self.current > self._window_peak:
            self._window_peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    # -- reading
    def reset_peak(self) -> None:
        """Start a new peak from the current bytes (``torch.cuda.reset_peak_memory_stats``)."""
        self.peak = self._window_peak = self.current

    def snapshot(self, label: str) -> dict:
        """Record the bytes now, the peak so far and the peak since the previous snapshot."""
        snap = {"label": label, "current_bytes": self.current, "peak_bytes": self.peak,
                "peak_since_last_bytes": self._window_peak}
        self.snapshots.append(snap)
        self._window_peak = self.current
        return snap

    def report(self) -> dict:
        return {"peak_bytes": self.peak, "current_bytes": self.current,
                "snapshots": list(self.snapshots)}


class CudaMemoryCounter:
    """The :class:`LiveBytes` interface over the real CUDA caching allocator's statistics.

    ``current``/``peak`` are ``memory_allocated``/``max_memory_allocated`` (also the reserved
    figures). Entering resets the peak statistics; snapshots reset them too, keeping the overall
    peak here. Untested where it was written (no GPU there).
    """

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = torch.device(device)
        self.snapshots: list[dict] = []
        self._peak = 0
        self._peak_reserved = 0

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self._fold()
        return False

    def _fold(self) -> None:
        self._peak = max(self._peak, torch.cuda.max_memory_allocated(self.device))
        self._peak_reserved = max(self._peak_reserved, torch.cuda.max_memory_reserved(self.device))

    @property
    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    @property
    def peak(self) -> int:
        self._fold()
        return self._peak

    def track(self, *items: Any) -> int:  # the allocator sees everything already
        return 0

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._peak = self.current
        self._peak_reserved = torch.cuda.memory_reserved(self.device)

    def snapshot(self, label: str) -> dict:
        torch.cuda.synchronize(self.device)
        window = torch.cuda.max_memory_allocated(self.device)
        window_reserved = torch.cuda.max_memory_reserved(self.device)
        self._fold()
        snap = {"label": label, "current_bytes": self.current, "peak_bytes": self._peak,
                "peak_since_last_bytes": window,
                "reserved_bytes": torch.cuda.memory_reserved(self.device),
                "peak_reserved_bytes": self._peak_reserved,
                "peak_reserved_since_last_bytes": window_reserved}
        self.snapshots.append(snap)
        torch.cuda.reset_peak_memory_stats(self.device)
        return snap

    def report(self) -> dict:
        torch.cuda.synchronize(self.device)
        self._fold()
        return {"peak_bytes": self._peak, "current_bytes": self.current,
                "peak_reserved_bytes": self._peak_reserved, "snapshots": list(self.snapshots)}


class _CpuStaysReal(TorchDispatchMode):
    """Under a FakeTensorMode, let ops that touch no fake tensor and no CUDA device run for real.

    Data preparation, CPU random draws, masks and ``.item()`` on CPU tensors then behave as usual
    (and meta-device model building stays plain meta). ``.item()`` of a fake tensor returns
    ``item_value`` (0): there is no data to read.
    """

    def __init__(self, item_value: float = 0):
        super().__init__()
        self.item_value = item_value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            t = args[0]
            if t.dtype == torch.bool:
                return bool(self.item_value)
            return (float(self.item_value) if t.dtype.is_floating_point or t.dtype.is_complex
                    else int(self.item_value))
        if any(isinstance(x, FakeTensor) for x in leaves) or any(
            isinstance(x, torch.device) and x.type == "cuda" for x in leaves
        ):
            return func(*args, **kwargs)
        with unset_fake_temporarily():
            return func(*args, **kwargs)


def _fake_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    """``F.scaled_dot_product_attention`` as a real GPU would dispatch it (never the math kernel).

    On a CPU build, fake CUDA tensors always take the math kernel, which stores (B, H, L, L)
    probabilities in fp32; a GPU picks flash attention (fp16/bf16, head dim <= 256, no mask) or
    memory-efficient attention.
    """
    if not isinstance(query, FakeTensor) or query.device.type != "cuda" or enable_gqa:
        return _ORIG_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if torch.is_autocast_enabled("cuda"):  # autocast lists SDPA as lower precision
        dt = torch.get_autocast_dtype("cuda")
        query, key, value = (x.to(dt) if x.is_floating_point() else x for x in (query, key, value))
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    if (attn_mask is None and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] <= 256 and query.shape[-1] == value.shape[-1]):
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:  # as the real dispatcher: boolean mask -> additive bias
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device
                                    ).masked_fill(attn_mask.logical_not(), float("-inf"))
        elif attn_mask.dtype != query.dtype:
            attn_mask = attn_mask.to(query.dtype)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, needs_grad, dropout_p, is_causal, scale=scale)[0]


def _swap_tensors_fake_ok(t1, t2):
    """``torch.utils.swap_tensors`` that also works for fake tensors.

    The swap fails because FakeTensorMode's memo keeps a weak reference to every fake Parameter;
    dropping those memo entries (only used to map real tensors to their fakes) allows it, and with
    it ``Module.to()``, ``.half()``, ``.to_empty()`` and peft's ``add_adapter`` on fake modules.
    """
    for t in (t1, t2):
        if isinstance(t, FakeTensor):
            memo = t.fake_mode.fake_tensor_converter.meta_converter.tensor_memo
            keys = [r.key for r in weakref.getweakrefs(t) if isinstance(r, weakref.KeyedRef)]
            for k in keys:
                if memo.get(k) is t:
                    del memo[k]
    return _ORIG_SWAP(t1, t2)


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _appended(lst: list, item: Any) -> Iterator[None]:
    added = item not in lst
    if added:
        lst.append(item)
    try:
        yield
    finally:
        if added and item in lst:
            lst.remove(item)


@contextlib.contextmanager
def fake_cuda_patches(counter: LiveBytes | None = None) -> Iterator[None]:
    """The process patches that make fake CUDA behave like a GPU (README points 2 and 3, and more).

    - ``torch.autocast("cuda")`` and ``GradScaler`` apply their CUDA policy (they would disable
      themselves: "CUDA is not available").
    - ``F.scaled_dot_product_attention`` picks flash / memory-efficient kernels (:func:`_fake_sdpa`).
    - ``torch.utils.swap_tensors`` accepts fake tensors (:func:`_swap_tensors_fake_ok`).
    - Optimizers and ``clip_grad_norm_`` default to their foreach implementations as on CUDA
      (``FakeTensor`` added to the types that qualify).
    - ``torch.cuda.memory_allocated``/``max_memory_allocated``/``reset_peak_memory_stats`` read
      ``counter``; ``torch.cuda.synchronize``/``empty_cache`` do nothing.
    """
    import torch.cuda.amp.common as amp_common
    import torch.optim.optimizer as optim_mod
    import torch.utils._foreach_utils as foreach_utils

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(amp_common, "amp_definitely_not_available", lambda: False))
        stack.enter_context(_patched(F, "scaled_dot_product_attention", _fake_sdpa))
        stack.enter_context(_patched(torch.utils, "swap_tensors", _swap_tensors_fake_ok))
        stack.enter_context(_appended(optim_mod._foreach_supported_types, FakeTensor))
        stack.enter_context(_appended(foreach_utils._foreach_supported_types, FakeTensor))
        stack.enter_context(_patched(torch.cuda, "synchronize", lambda device=None: None))
        stack.enter_context(_patched(torch.cuda, "empty_cache", lambda: None))
        if counter is not None:
            stack.enter_context(_patched(torch.cuda, "memory_allocated",
                                         lambda device=None: counter.current))
            stack.enter_context(_patched(torch.cuda, "max_memory_allocated",
                                         lambda device=None: counter.peak))
            stack.enter_context(_patched(torch.cuda, "reset_peak_memory_stats",
                                         lambda device=None: counter.reset_peak()))
        yield


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
        self._cpu_mode: _CpuStaysReal | None = None

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
                    if not torch_is_gpu_build() and _SHIM_LOADED is None:
                        raise RuntimeError(
                            "fake-CUDA tracing on a CPU build needs the shim loaded before torch: "
                            "use run_traced()")
                    self.fake_mode = stack.enter_context(
                        FakeTensorMode(allow_non_fake_inputs=True))
                    stack.enter_context(fake_cuda_patches(self.counter))  # type: ignore[arg-type]
                    self._cpu_mode = stack.enter_context(_CpuStaysReal(self.item_value))
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
    """The trace session the calling code runs in (inside :func:`run_traced` or
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


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not isinstance(x, FakeTensor):
        return x.item()
    return str(x)


def run_local(fn: Callable | str, kwargs: Mapping[str, Any] | None = None, *,
              mode: str = "cpu") -> dict:
    """Run ``fn(**kwargs)`` in this process inside a ``cpu`` or ``cuda`` session.

    Returns the same dict as :func:`run_traced` (``result`` is what fn returned, unconverted).
    Fake mode needs a fresh process: use :func:`run_traced`.
    """
    if mode == "fake" and _SHIM_LOADED is None and not torch_is_gpu_build():
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
    dict as :func:`run_traced`.
    """
    return run_local(fn, kwargs, mode="cpu")


def _child_main(argv: list[str]) -> int:
    import argparse
    import traceback

    ap = argparse.ArgumentParser(prog="python -m lowmcgm.memory.trace",
                                 description="Run a function inside a memory trace session.")
    ap.add_argument("--fn", required=True, help="module:function")
    ap.add_argument("--kwargs", help="JSON file of keyword arguments (or inline JSON)")
    ap.add_argument("--out", help="write the JSON result here (default: stdout)")
    ap.add_argument("--mode", default="auto", choices=MODES)
    ap.add_argument("--shim", help="compiled shim (loaded by the bootstrap)")
    args = ap.parse_args(argv)

    def emit(payload: dict) -> None:
        text = json.dumps(_jsonable(payload), indent=1)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        else:
            print(text)

    try:
        kwargs = {}
        if args.kwargs:
            src = args.kwargs
            kwargs = json.loads(Path(src).read_text() if os.path.exists(src) else src)
        mode = args.mode
        if mode == "auto":
            mode = "cuda" if torch_is_gpu_build() and torch.cuda.is_available() else "fake"
        func = _resolve(args.fn)
        sess = TraceSession(mode)
        start = time.perf_counter()
        with sess.activate():
            result = func(**kwargs)
        payload = sess.report()
        payload["wall_s"] = round(time.perf_counter() - start, 3)
        payload["torch_version"] = torch.__version__
        payload["result"] = result
        emit(payload)
        return 0
    except BaseException as e:  # noqa: BLE001  (reported to the parent, then non-zero exit)
        emit({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        return 1


# ----------------------------------------------------------------------------------------------
# Part 3: traceable functions shipped with the module (smoke test and self-check).
# ----------------------------------------------------------------------------------------------

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _config_folder(name_or_path: str) -> Path:
    from lowmcgm.model_configs import SHIPPED_CONFIGS

    return SHIPPED_CONFIGS[name_or_path] if name_or_path in SHIPPED_CONFIGS else Path(name_or_path)


def _train_steps(model: torch.nn.Module, make_batch: Callable[[], tuple], steps: int,
                 compute_dtype: torch.dtype, optimizer: torch.optim.Optimizer) -> dict:
    """Forward (autocast unless fp32), MSE to the input, backward, optimizer step; with snapshots
    and the byte counts of gradients and optimizer state."""
    s = session()
    params = [p for p in model.parameters() if p.requires_grad]
    parts: dict[str, int] = {}
    for i in range(steps):
        sample, t, ctx = make_batch()
        with s.autocast(compute_dtype):
            pred = model(sample, t, ctx).sample
        loss = F.mse_loss(pred.float(), sample.float())
        s.snapshot(f"step{i}.forward")
        loss.backward()
        del pred, loss
        parts["gradient_bytes"] = storage_bytes(p.grad for p in params)
        s.snapshot(f"step{i}.backward")
        optimizer.step()
        parts["optimizer_state_bytes"] = storage_bytes(optimizer)
        s.snapshot(f"step{i}.optimizer")
        optimizer.zero_grad(set_to_none=True)
    return parts


def unet_lora_step(config_name: str = "sd15", resolution: int = 512, rank: int = 4,
                   gradient_checkpointing: bool = True, dtype: str = "fp16", steps: int = 2,
                   batch_size: int = 1, target_modules: list[str] | tuple[str, ...] = LORA_TARGETS,
                   text_tokens: int = 77, resident_encoders: bool = False) -> dict:
    """Traceable: LoRA training steps of a UNet built from a config (the memory probe's setup).

    Frozen UNet in ``dtype``, LoRA (peft ``inject_adapter_in_model``, rank ``rank``, alpha = rank)
    in fp32, autocast to ``dtype``, AdamW (torch's default implementation for the device), MSE to
    the input latents, ``steps`` steps (the second has optimizer state: steady state). With
    ``resident_encoders`` the frozen text encoder and VAE weights (in ``dtype``) are also on the
    device, idle (they are not run); otherwise the UNet is alone.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextModel

    s = session()
    weight_dtype = torch_dtype(dtype)
    folder = _config_folder(config_name)
    encoder_bytes = 0
    if resident_encoders:
        encoders = [build_from_config(CLIPTextModel, folder / "text_encoder"),
                    build_from_config(AutoencoderKL, folder / "vae")]
        for m in encoders:
            m.requires_grad_(False)
            materialize_fake(m, lambda n, p: weight_dtype)
        encoder_bytes = storage_bytes(encoders)
    unet = build_from_config(UNet2DConditionModel, folder / "unet")
    unet.requires_grad_(False)
    if rank > 0:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                           target_modules=list(target_modules)), unet)
    materialize_fake(unet, lambda n, p: torch.float32 if p.requires_grad else weight_dtype)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    parts = {"frozen_weight_bytes": storage_bytes(p for p in unet.parameters() if not p.requires_grad),
             "trainable_weight_bytes": storage_bytes(trainable),
             "trainable_params": sum(p.numel() for p in trainable),
             "params": sum(p.numel() for p in unet.parameters()),
             "encoder_weight_bytes": encoder_bytes}
    s.snapshot("weights")
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    lat = resolution // 8
    cross = unet.config.cross_attention_dim

    def batch():
        return (torch.randn(batch_size, unet.config.in_channels, lat, lat, device=s.device,
                            dtype=weight_dtype),
                torch.randint(0, 1000, (batch_size,), device=s.device),
                torch.randn(batch_size, text_tokens, cross, device=s.device, dtype=weight_dtype))

    parts.update(_train_steps(unet, batch, steps, weight_dtype, opt))
    parts["peak_bytes"] = s.counter.peak
    return parts


def trace_unet_lora_step(config_name: str = "sd15", resolution: int = 512, rank: int = 4,
                         gradient_checkpointing: bool = True, dtype: str = "fp16", *,
                         steps: int = 2, batch_size: int = 1, resident_encoders: bool = False,
                         mode: str = "auto", timeout_s: float = 600.0) -> dict:
    """Smoke test of the whole machinery: :func:`unet_lora_step` in a traced subprocess.

    On SD 1.5 at 512 px (fake CUDA, LoRA r4, fp16, AdamW, 2 steps) this gives 1.865 GiB with
    gradient checkpointing and 2.704 GiB without for the UNet alone (what the probe prints), and
    2.25 / 3.09 GiB with the fp16 CLIP-L and VAE weights resident (``resident_encoders``).

    Returns:
        :func:`run_traced`'s dict; ``["peak_bytes"]`` is the peak.
    """
    return run_traced("lowmcgm.memory.trace:unet_lora_step",
                      dict(config_name=config_name, resolution=resolution, rank=rank,
                           gradient_checkpointing=gradient_checkpointing, dtype=dtype,
                           steps=steps, batch_size=batch_size,
                           resident_encoders=resident_encoders),
                      timeout_s, mode=mode)


TINY_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=32,
)


def tiny_unet_step(latent_size: int = 16, steps: int = 2, lora_rank: int = 0,
                   gradient_checkpointing: bool = False, dtype: str = "fp32",
                   batch_size: int = 1, text_tokens: int = 8, foreach: bool | None = False,
                   config: dict | None = None) -> dict:
    """Traceable: training steps of a tiny UNet2DConditionModel (block channels (32, 64), cross
    attention dim 32): the self-check that fake-CUDA figures match real CPU ones.

    ``lora_rank`` 0 trains every parameter, else LoRA on the attention projections. ``foreach``
    is passed to AdamW (False by default so CPU and CUDA take the same implementation).
    """
    from diffusers import UNet2DConditionModel

    s = session()
    weight_dtype = torch_dtype(dtype)
    cfg = dict(TINY_UNET_CONFIG, **(config or {}))
    cfg["sample_size"] = latent_size
    unet = build_from_config(UNet2DConditionModel, cfg)
    if lora_rank > 0:
        from peft import LoraConfig, inject_adapter_in_model

        unet.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                           target_modules=list(LORA_TARGETS)), unet)
    materialize_fake(unet, lambda n, p: torch.float32 if p.requires_grad else weight_dtype)
    s.snapshot("weights")
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4,
                            foreach=foreach)

    def batch():
        return (torch.randn(batch_size, 4, latent_size, latent_size, device=s.device,
                            dtype=weight_dtype),
                torch.randint(0, 1000, (batch_size,), device=s.device),
                torch.randn(batch_size, text_tokens, cfg["cross_attention_dim"], device=s.device,
                            dtype=weight_dtype))

    parts = _train_steps(unet, batch, steps, weight_dtype, opt)
    parts["params"] = sum(p.numel() for p in unet.parameters())
    parts["peak_bytes"] = s.counter.peak
    return parts
