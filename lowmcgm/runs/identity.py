"""What makes a checkpoint's run the same run as the one ``--resume`` asks for.

Settings are compared by value, input files by content (sha256), never by how their paths are
spelled: the same photo under another path resumes, a rotated photo or swapped masks under the same
paths do not. The base model is compared by its architecture hash once it is loaded, before
anything is written. Each refusal names the settings that differ.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lowmcgm.config import Config
from lowmcgm.errors import UserError

# Settings that name input files: compared by the files' contents, not their paths.
INPUT_FILE_KEYS = ("data.image", "data.masks", "lora.init_lora", "train.class_images_dir")
_SHOWN = 3  # differences named in one message


def _digest(path: str) -> str:
    """sha256 of a file, or of a folder's files (names and contents); '' for no path."""
    if not path:
        return ""
    path_obj = Path(path).expanduser()
    digest = hashlib.sha256()
    files = sorted(p for p in path_obj.rglob("*") if p.is_file()) if path_obj.is_dir() else [path_obj]
    for file in files:
        digest.update(str(file.relative_to(path_obj) if path_obj.is_dir() else "").encode())
        try:
            with open(file, "rb") as fh:
                for chunk in iter(lambda: fh.read(2**20), b""):
                    digest.update(chunk)
        except OSError:
            digest.update(b"<unreadable>")
    return digest.hexdigest()


def input_fingerprints(cfg: Config) -> dict[str, Any]:
    """Content hashes of every input file, by setting (``data.masks``: one per mask, in order)."""
    return {"data.image": _digest(cfg.data.image), "data.masks": [_digest(m) for m in cfg.data.masks],
            "lora.init_lora": _digest(cfg.lora.init_lora), "train.class_images_dir": _digest(cfg.train.class_images_dir)}


def resume_differences(stored: dict[str, Any], current: dict[str, Any], stored_inputs: dict[str, Any] | None,
                       current_inputs: dict[str, Any], cfg: Config) -> list[str]:
    """What differs between a checkpoint's run and this one, each as a phrase naming the setting.

    Args:
        stored, current: the two runs' settings as nested dicts (section -> key -> value).
        stored_inputs: the checkpoint's ``input_fingerprints``; None for a checkpoint from before
            they were recorded (then input paths are compared as settings).
        cfg: this run's config, for file names in messages.
    """
    flat_stored, flat_current = _flatten(stored), _flatten(current)
    if stored_inputs is not None:
        for key in INPUT_FILE_KEYS:
            flat_stored.pop(key, None)
            flat_current.pop(key, None)
    found = [f"{key} is {flat_current.get(key)!r}, the checkpoint's {flat_stored.get(key)!r}"
             for key in sorted(flat_stored.keys() | flat_current.keys()) if flat_stored.get(key) != flat_current.get(key)]
    if stored_inputs is not None:
        found = _input_differences(stored_inputs, current_inputs, cfg) + found
    return found


def _input_differences(stored: dict[str, Any], current: dict[str, Any], cfg: Config) -> list[str]:
    found = []
    if stored.get("data.image") != current["data.image"]:
        found.append(f"data.image {cfg.data.image} has other contents than the checkpoint's photo")
    masks, stored_masks = current["data.masks"], stored.get("data.masks") or []
    if len(masks) != len(stored_masks):
        found.append(f"data.masks has {len(masks)} masks, the checkpoint's run {len(stored_masks)}")
    else:
        for i, (now, then) in enumerate(zip(masks, stored_masks)):
            if now != then:
                moved = f" (it is the checkpoint's mask {stored_masks.index(now) + 1}: masks swapped?)" \
                    if now in stored_masks else ""
                found.append(f"data.masks: mask {i + 1} ({cfg.data.masks[i]}) has other contents than the "
                             f"checkpoint's{moved}")
    for key in ("lora.init_lora", "train.class_images_dir"):
        if stored.get(key, "") != current[key]:
            found.append(f"{key} has other contents than the checkpoint's")
    return found


def describe(differences: list[str]) -> str:
    more = f"; and {len(differences) - _SHOWN} more" if len(differences) > _SHOWN else ""
    return "; ".join(differences[:_SHOWN]) + more


def check_same_base(info: dict[str, Any], base: Any, checkpoint: Path) -> None:
    """Refuse a base model of another architecture than the checkpoint's run trained on.

    Args:
        info: the checkpoint's info (``base_model``, ``base_model_hash``; older checkpoints lack them).
        base: the loaded ``BaseModel``.
    """
    recorded = info.get("base_model_hash")
    if recorded and recorded != base.config_hash:
        raise UserError(f"--resume: {checkpoint} was trained on base model '{info.get('base_model', '?')}' "
                        f"(config hash {recorded}), but '{base.name}' is another model (config hash "
                        f"{base.config_hash}): resume with the same base model, or start a new run with "
                        "--overwrite or another --out.")


def _flatten(nested: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in nested.items() for key, value in values.items()}
