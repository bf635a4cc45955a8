"""Output folders: checked before any work starts, and the effective config written into them."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lowmcgm.config import Config, to_toml
from lowmcgm.errors import UserError

# An SD LoRA artifact plus checkpoints is tens of MB; refuse to start with less free.
MIN_FREE_BYTES = 200 * 2**20


def check_output_dir(out: str, resume: bool = False, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Create ``out`` and prove it is writable and has room, before any training starts."""
    if not out:
        raise UserError("No output folder: pass --out DIR.")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"Output path {path} exists and is not a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"Output folder {path} is not writable ({exc.strerror}); choose another --out.") from exc
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise UserError(f"Output folder {path} has only {free / 2**20:.0f} MiB free; at least "
                        f"{min_free_bytes / 2**20:.0f} MiB are needed.")
    return path


def write_effective_config(cfg: Config, out: Path) -> Path:
    """Write ``config.toml`` (every field, defaults included) atomically into ``out``."""
    path = out / "config.toml"
    tmp = path.with_name(f".config.toml.tmp-{os.getpid()}")
    tmp.write_text("# The effective configuration of this run (lowmcgm train --config this-file works).\n"
                   + to_toml(cfg))
    os.replace(tmp, path)
    return path
