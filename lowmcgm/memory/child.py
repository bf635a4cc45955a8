"""The tracing subprocess that :func:`lowmcgm.memory.trace.run_traced` starts, run as a script::

    python lowmcgm/memory/child.py --fn module:function --kwargs FILE --out FILE --mode MODE [--shim SO]

Order is the point of this module: :func:`preload` puts lowmcgm's root on ``sys.path`` and loads the
fake-CUDA shim (:mod:`lowmcgm.memory.shim`, standard library only) *before* anything imports torch;
only then does :func:`main` import the session (and with it torch) and the traced function, run it
through :func:`lowmcgm.memory.session.run_local` and write the figures, or the error and its
traceback, as JSON to ``--out``. Hence this module's top level imports the standard library only.
The session and the shim's state live in their own modules, imported the usual way, so the traced
function and this entry point share them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Mapping

# The folder holding the lowmcgm package: put first on the subprocess's path.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def preload(argv: list[str]) -> None:
    """Subprocess bootstrap: put the package on sys.path and load the shim if fake mode needs it."""
    here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != here]  # script-mode entry
    if str(PACKAGE_ROOT) not in sys.path:
        sys.path.insert(0, str(PACKAGE_ROOT))
    # Standard library only: torch is not imported yet, and must not be before the shim loads.
    from lowmcgm.memory.shim import load_shim, torch_is_gpu_build

    mode = argv[argv.index("--mode") + 1] if "--mode" in argv else "auto"
    shim = argv[argv.index("--shim") + 1] if "--shim" in argv else None
    if mode in ("auto", "fake") and not torch_is_gpu_build():
        load_shim(shim)


def main(argv: list[str]) -> int:
    """Run the function ``--fn`` names in a trace session and write what it measured; after
    :func:`preload`. Returns the exit code (1 when the function raised)."""
    import torch  # after the shim

    from lowmcgm.memory.session import MODES, run_local
    from lowmcgm.memory.shim import torch_is_gpu_build

    ap = argparse.ArgumentParser(prog="python lowmcgm/memory/child.py",
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
        emit(run_local(args.fn, kwargs, mode=mode))
        return 0
    except BaseException as e:  # noqa: BLE001  (reported to the parent, then non-zero exit)
        emit({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        return 1


def _jsonable(x: Any) -> Any:
    """``x`` with what JSON cannot hold turned into strings (dtypes by name, one-element real
    tensors to their value). Called once torch is imported."""
    import torch  # imported already by then
    from torch._subclasses.fake_tensor import FakeTensor

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


if __name__ == "__main__":
    preload(sys.argv[1:])
    code = main(sys.argv[1:])
    # The result is written; leave without the interpreter's teardown. Tearing down torch's
    # autograd worker thread of the fake CUDA device sometimes ends in std::terminate ("terminate
    # called without an active exception", SIGABRT) on a loaded machine, which would turn a good
    # trace into a failure (measured: 1 run in 3 with both cores busy).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
