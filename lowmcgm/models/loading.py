"""Finding and loading the base model ``--base-model`` names; every failure is a UserError.

A base model is a diffusers folder, a hub id already in the local Hugging Face cache, a single
``.safetensors`` checkpoint (read with configs shipped in ``lowmcgm/models/configs``),
``tiny``/``tiny-v``/``tiny-xl`` (built from a seed, no download: ``tiny.py``) or ``toy`` (the
toy-world model shipped in the package, see ``toy/bundled.py``).
"""

from __future__ import annotations

from pathlib import Path

from lowmcgm.errors import UserError
from lowmcgm.models.base import TOY_NAME, BaseModel
from lowmcgm.models.folder import cached_hub_folder, check_folder_layout, load_folder
from lowmcgm.models.tiny import TINY_NAMES, build_tiny_base


def load_base_model(spec: str, single_file_config: str = "auto") -> BaseModel:
    """Load the base model named by ``--base-model``; every failure is a UserError.

    Args:
        spec: ``tiny``/``tiny-v``, ``toy`` (the bundled toy-world model), a diffusers folder, a
            ``.safetensors`` file, or a hub id that is already in the local Hugging Face cache
            (nothing is downloaded).
        single_file_config: for single files, which shipped config to read them with.
    """
    kind, path, name = locate_base_model(spec)
    if kind == "tiny":
        return build_tiny_base(spec)
    if kind == "toy":
        from lowmcgm.toy.bundled import load_toy_base

        return load_toy_base()
    if kind == "file":
        from lowmcgm.models.single_file import load_single_file

        return load_single_file(path, single_file_config)
    return load_folder(path, name)


def locate_base_model(spec: str) -> tuple[str, Path, str]:
    """What a ``--base-model`` names and where it lives, checked without reading weights.

    Returns:
        ``("folder", path, name)`` for a diffusers folder (a cached hub id's included),
        ``("file", path, name)`` for a single ``.safetensors`` file, or ``("tiny", Path(), spec)``
        / ``("toy", Path(), spec)`` for the models built in (nothing to find).

    Raises:
        UserError: what ``load_base_model`` would refuse before loading: a missing file or folder,
            a pickled checkpoint, a folder without the diffusers layout, a hub id not in the cache.
    """
    if spec in TINY_NAMES or spec == TOY_NAME:
        return ("tiny" if spec in TINY_NAMES else "toy"), Path(), spec
    path = Path(spec).expanduser()
    if path.is_dir():
        check_folder_layout(path)
        return "folder", path, path.name
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".bin"):
        if not path.is_file():
            raise UserError(f"Base model file not found: {path}.")
        if path.suffix != ".safetensors":
            raise UserError(f"Base model {path} is not a .safetensors file; lowmcgm never unpickles "
                            "checkpoints: convert it to .safetensors first.")
        return "file", path, path.name
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"Base model '{spec}' is neither a diffusers folder, a .safetensors file, "
                        "a hub id in the local cache, nor 'tiny' or 'toy'.")
    folder = cached_hub_folder(spec)
    check_folder_layout(folder)
    return "folder", folder, spec
