"""Output folders: checked before any work starts, and the effective config written into them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lowmcgm.config import Config, apply_overrides, load_toml, to_toml
from lowmcgm.errors import UserError
from lowmcgm.runs.write_guard import check_writable_folder, write_text_whole

# An SD LoRA artifact plus checkpoints is tens of MB; refuse to start with less free.
MIN_FREE_BYTES = 200 * 2**20


def check_output_dir(out: str, resume: bool = False, min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Create ``out`` and prove it is writable and has room, before any training starts."""
    if not out:
        raise UserError("No output folder: pass --out DIR.")
    path = check_writable_folder(Path(out).expanduser())
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise UserError(f"Output folder {path} has only {free / 2**20:.0f} MiB free; at least "
                        f"{min_free_bytes / 2**20:.0f} MiB are needed.")
    return path


def first_missing_folder(out: str | Path) -> Path | None:
    """The outermost part of ``out`` that does not exist yet (what a run would create), or None."""
    if not out:
        return None
    path = Path(out).expanduser().absolute()
    missing = None
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            break
        missing = part
    return missing


def remove_empty_folders(top: Path | None) -> None:
    """Remove ``top`` and the folders below it that hold no file: what a refused run created.

    Only empty folders go (``os.rmdir`` refuses any other), so a checkpoint or a written file keeps
    its folder; ``top`` comes from ``first_missing_folder`` taken before the run, so nothing that
    existed before is touched.
    """
    if top is None or top.is_symlink() or not top.is_dir():
        return
    for folder, _, _ in os.walk(top, topdown=False):
        try:
            os.rmdir(folder)
        except OSError:
            pass


def write_effective_config(cfg: Config, out: Path, notes: tuple[str, ...] = ()) -> Path:
    """Write ``config.toml`` (every field, defaults included) atomically into ``out``.

    A ``config.toml`` that already holds exactly these settings is left as it is: a resume that
    reads the run's own config (``--config <out>/config.toml --resume``) does not write over the
    file it read, and the comments a user added to it stay.

    Args:
        notes: what the settings resolved to on the loaded model (e.g. which attention maps a
            0 for "derive it" picked), written as comments at the top.
    """
    if _holds_settings(out / "config.toml", cfg):
        return out / "config.toml"
    header = "# The effective configuration of this run (lowmcgm train --config this-file works).\n"
    header += "".join(f"# On this model, {note}.\n" for note in notes)
    return write_text_whole(out / "config.toml", header + to_toml(cfg))


def _holds_settings(path: Path, cfg: Config) -> bool:
    """Whether the TOML file ``path`` sets exactly ``cfg`` (False when missing or unreadable)."""
    if not path.is_file():
        return False
    try:
        return apply_overrides(Config(), load_toml(path), str(path)) == cfg
    except UserError:
        return False
