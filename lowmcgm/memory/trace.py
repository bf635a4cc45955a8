"""Peak GPU memory of arbitrary PyTorch code, measured without a GPU (fake CUDA tensors) or with one.

The machinery behind ``lowmcgm estimate``: run a Python function, typically "one training step on
models built from their configs", and count the bytes it keeps live on the accelerator. This module
is its public entry: :func:`run_traced` (start a traced subprocess, read its figures) and the names
a traced function uses, from the modules that own them:

- :mod:`~lowmcgm.memory.shim`: building and loading the C++ shim ``fake_cuda_guard.cpp`` (cache
  folder, torch build information) and the errors (:class:`TraceError`); no torch.
- :mod:`~lowmcgm.memory.child`: the subprocess :func:`run_traced` starts; loads the shim, then torch.
- :mod:`~lowmcgm.memory.session`: :class:`TraceSession`, :func:`session`, building models from
  configs (:func:`build_from_config`, :func:`materialize_fake`), :func:`run_local`.
- :mod:`~lowmcgm.memory.counters`: :class:`LiveBytes`, :class:`CudaMemoryCounter`, :func:`storage_bytes`.
- :mod:`~lowmcgm.memory.fake_cuda`: the patches that make fake CUDA behave like a GPU.

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
refuses is made possible, see :func:`fake_cuda_patches`). ``torch.cuda.max_memory_allocated()`` and
friends report the fake counter. A torch ``Generator`` on ``cuda`` cannot be created: draw on CPU
and move, or pass no generator.

Caveats of the fake figures: they are what ``max_memory_allocated`` would report (live storages
rounded to 512 B), not counting kernel-internal workspaces (cuBLAS/cuDNN, up to ~100 MiB), the
CUDA context (0.3-0.6 GiB) and the caching allocator's slack (``max_memory_reserved`` is 5-20 %
higher). Attention takes the kernel a real GPU would pick (flash for fp16/bf16 and head dim
<= 256 without a mask, memory-efficient otherwise), never the math kernel. bitsandbytes kernels do
not run under fake tensors: account for them analytically.

Importing this module imports torch; the function it names must be importable in the subprocess,
whose path is lowmcgm's root, then this process's own additions to ``sys.path`` (a test folder, a
script's folder), then ``$PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from torch._subclasses.fake_tensor import FakeTensor

from lowmcgm.memory import child
from lowmcgm.memory.counters import CudaMemoryCounter, LiveBytes, storage_bytes
from lowmcgm.memory.fake_cuda import fake_cuda_patches
from lowmcgm.memory.session import (MODES, TraceSession, build_from_config, current_session, materialize,
                                    materialize_fake, measure_real_cpu, run_local, session)
from lowmcgm.memory.shim import (SHIM_SOURCE, ShimBuildError, TraceError, cache_dir, ensure_shim, load_shim,
                                 torch_is_gpu_build, torch_version)

__all__ = [
    "MODES", "SHIM_SOURCE", "TraceError", "ShimBuildError", "cache_dir", "torch_is_gpu_build",
    "torch_version", "ensure_shim", "load_shim", "run_traced", "run_local", "measure_real_cpu",
    "session", "current_session", "TraceSession", "LiveBytes", "CudaMemoryCounter", "storage_bytes",
    "materialize_fake", "materialize", "build_from_config", "fake_cuda_patches", "FakeTensor",
]


def _child_pythonpath() -> str:
    """PYTHONPATH for the subprocess: lowmcgm's root, then what this process can import that a
    fresh interpreter would not find (pytest's rootdir inserts, sys.path edits), then $PYTHONPATH."""
    skip = {os.path.realpath(p) for p in sysconfig.get_paths().values() if p}
    entries = [str(child.PACKAGE_ROOT)]
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
        cmd = [python or sys.executable, str(Path(child.__file__).resolve()), "--fn", fn_qualname,
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
