"""What a command may write: never a file it reads, never an existing file unless asked, and every
write failure as one line.

Three rules, one place:

- ``check_not_inputs``: an output that is one of the command's inputs (the same path, resolved,
  or the same file under another name: same device and inode, as a hard link or a symlink gives)
  is refused before anything is written. ``export A --out A`` would otherwise replace the trained
  artifact by a LoRA without its mask encoder.
- ``check_new_files``: an existing file is replaced only with ``--force``.
- ``check_writable_folder`` and ``writing``: a folder is proven writable by writing into it (root
  passes every permission test, but not a read-only or kernel file system), and an ``OSError``
  while writing becomes a ``UserError`` naming the file.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from safetensors import SafetensorError

from lowmcgm.errors import UserError


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def check_not_inputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path], folders: Iterable[str | Path] = ()
                     ) -> None:
    """Refuse when a file the command writes is a file it reads.

    Args:
        outputs: the files the command will write (or replace, or remove).
        inputs: the files it reads (empty strings are skipped).
        folders: folders the command writes into with names decided later (previews, samples):
            an input inside one is refused too.

    Raises:
        UserError: naming the input and the output.
    """
    readers = [(Path(p).expanduser(), Path(p).expanduser().resolve(), _identity(Path(p).expanduser()))
               for p in inputs if str(p)]
    for out in outputs:
        out = Path(out).expanduser()
        resolved, identity = out.resolve(), _identity(out)
        for given, real, ident in readers:
            if resolved == real or (identity is not None and identity == ident):
                raise UserError(f"{out} is also an input of this command ({given}); writing it would destroy it: "
                                "choose another output path.")
    for folder in folders:
        real_folder = Path(folder).expanduser().resolve()
        for given, real, _ in readers:
            if real_folder in real.parents:
                raise UserError(f"Input {given} lies in {folder}, which this command writes into: move it out "
                                "first, or choose another output path.")


def check_new_files(paths: Iterable[Path], force: bool) -> None:
    """Refuse to replace existing files unless ``force`` (``--force``); folders are the caller's to refuse."""
    if force:
        return
    existing = [Path(p) for p in paths if (Path(p).exists() or Path(p).is_symlink()) and not Path(p).is_dir()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} already exists{more}: pass --force to replace it, or choose another --out.")


def check_writable_folder(folder: Path) -> Path:
    """Create ``folder`` and prove it takes a file (removed again); return it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"Output path {folder} exists and is not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"Output folder {folder} is not writable ({exc.strerror or exc}); choose another --out.") \
            from exc
    return folder


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failure to write ``path`` (permissions, a full disk, a read-only file system) into a UserError.

    safetensors reports its I/O errors as ``SafetensorError`` (not an ``OSError``): those are caught too.
    """
    try:
        yield
    except OSError as exc:
        raise UserError(f"Cannot write {path} ({exc.strerror or exc}); choose another output path or free "
                        "some space.") from exc
    except SafetensorError as exc:
        if "I/O error" not in str(exc):
            raise
        reason = str(exc).split("I/O error: ", 1)[-1].split(" (os error")[0]
        raise UserError(f"Cannot write {path} ({reason}); choose another output path or free some space.") from exc
