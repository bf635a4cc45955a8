"""The fake-CUDA shim: building ``fake_cuda_guard.cpp`` against the installed torch and loading it.

The shim makes a CPU-only torch believe a CUDA device exists, so that fake CUDA tensors go through
autograd. It is compiled once per torch version into :func:`cache_dir` and must be loaded *before*
``import torch`` (torch caches its CUDA hooks at import time), which is why a fake trace runs in a
subprocess of its own (:mod:`lowmcgm.memory.runner`).

This module uses the standard library only and never imports torch: the tracing subprocess imports
it first. It also holds the errors of the tracing machinery (:class:`TraceError`), so that every
module of ``lowmcgm.memory`` can raise them without importing torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHIM_SOURCE = Path(__file__).resolve().with_name("fake_cuda_guard.cpp")
_SHIM_LOADED: str | None = None  # path of the loaded shim, in the process that loaded it


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


def torch_version() -> str:
    """The installed torch's version, read without importing torch (part of the shim's cache key)."""
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
        source + f"|{torch_dir}|{torch_version()}|{sys.version_info[:2]}|{abi}".encode()
    ).hexdigest()[:12]
    version = re.sub(r"[^A-Za-z0-9.+_-]", "_", torch_version())
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
            "through run_traced() (a fresh subprocess). If this is the tracing subprocess "
            "(lowmcgm/memory/runner.py), something imported torch first (lowmcgm/__init__.py?)"
        )
    ctypes.CDLL(path, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    _SHIM_LOADED = path
    return path


def shim_loaded() -> str | None:
    """The path of the shim loaded into this process, or None."""
    return _SHIM_LOADED
