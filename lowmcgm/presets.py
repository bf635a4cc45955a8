"""Resolving a preset name (``8gb``) to its shipped TOML file, and listing presets."""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

from lowmcgm.errors import UserError


def presets_dir() -> Path:
    """The folder of shipped presets: the checkout's ``presets/`` or the installed data copy."""
    for candidate in (Path(__file__).resolve().parent.parent / "presets",
                      Path(sys.prefix) / "share" / "lowmcgm" / "presets"):
        if candidate.is_dir():
            return candidate
    raise UserError("The shipped presets folder is missing: reinstall lowmcgm.")


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description (the file's first comment line), in the order people
    read sizes: ``4gb`` before ``12gb``, ``sdxl-6gb`` before ``sdxl-12gb`` (not the names' letters)."""
    out = {}
    for path in sorted(presets_dir().glob("*.toml"), key=_natural):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        out[path.stem] = first.lstrip("# ").strip()
    return out


def _natural(path: Path) -> list:
    """A sort key that reads the numbers in a name as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)]


def preset_path(name: str) -> Path:
    """A preset name or a path to a TOML file -> the file."""
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"Preset file not found: {path}.")
        return path
    path = presets_dir() / f"{name}.toml"
    if not path.is_file():
        names = list(list_presets())
        lowered = {n.lower(): n for n in names}
        close = [lowered[name.lower()]] if name.lower() in lowered else difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UserError(f"Unknown preset '{name}'; valid presets: {', '.join(names)}.{hint}")
    return path
