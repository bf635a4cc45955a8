"""What a command may write: never a file it reads, never an existing file unless asked, and every
write failure as one line.

Three rules, one place:

- ``check_not_inputs``: an output that is one of the command's inputs (``same_file``: the same
  path, resolved, or the same file under another name: same device and inode, as a hard link or a
  symlink gives) is refused before anything is written. ``export A --out A`` would otherwise replace the trained
  artifact by a LoRA without its mask encoder.
- ``check_new_files``: an existing file is replaced only with ``--force``.
- ``check_writable_folder`` and ``writing``: a folder is proven writable by writing into it (root
  passes every permission test, but not a read-only or kernel file system), and an ``OSError``
  while writing becomes a ``UserError`` naming the file.
- ``replacing``: every file is written whole or not at all: under a temporary name beside it,
  renamed over it once complete (a full disk leaves the old file, or none, never half of one);
  ``finish_temporary`` flushes a large one to disk first, and ``remove_stale_temporaries`` clears
  those a killed process left.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from safetensors import SafetensorError

from lowmcgm.errors import UserError


def _identity(target: int | Path) -> tuple[int, int] | None:
    """(device, inode) of a path (followed through symlinks) or an open file descriptor; None if absent."""
    try:
        info = os.fstat(target) if isinstance(target, int) else target.stat()
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def same_file(a: int | str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once resolved (``..``, symlinks; the file
    need not exist yet), or the same device and inode (a hard link, a bind mount).

    Args:
        a: a path, or an open file descriptor (then compared by device and inode only).
        b: a path.
    """
    b = Path(b).expanduser()
    if not isinstance(a, int):
        a = Path(a).expanduser()
        if a.resolve() == b.resolve():
            return True
    identity = _identity(a)
    return identity is not None and identity == _identity(b)


def inside_folder(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` lies (at any depth) in ``folder``, both resolved: ``out/previews/../x`` is not in
    ``out/previews``, a symlink into it is."""
    return Path(folder).expanduser().resolve() in Path(path).expanduser().resolve().parents


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
    readers = [Path(p).expanduser() for p in inputs if str(p)]
    for out in outputs:
        out = Path(out).expanduser()
        for given in readers:
            if same_file(out, given):
                raise UserError(f"{out} is also an input of this command ({given}); writing it would destroy it: "
                                "choose another output path.")
    for folder in folders:
        for given in readers:
            if inside_folder(given, folder):
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


def check_writable_folder(folder: Path, flag: str = "--out") -> Path:
    """Create ``folder`` and prove it takes a file (removed again); return it.

    Args:
        flag: the option that named the folder, for the message (``--root``, ``--events``).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"Output path {folder} exists and is not a folder; choose another {flag}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"Output folder {folder} is not writable ({exc.strerror or exc}); choose another {flag}.") \
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


def temporary_name(path: Path) -> Path:
    """Where ``replacing`` writes ``path`` first: a hidden name beside it, with this process's id
    (``remove_stale_temporaries`` removes a killed process's leftovers by that id)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete ``replacing``'s temporaries (``temporary_name``) in ``folder`` left by a process that no longer runs.

    A killed run (SIGKILL, power loss) cannot clean up after itself; its half-written files are
    removed when a run resumes in the same folder. Returns the files removed.
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp-*"):
        pid = tmp.name.rpartition(".tmp-")[2]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)) or not tmp.is_file():
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or a number no process has: leave the file alone
    return True


def finish_temporary(tmp: Path) -> None:
    """Flush ``tmp`` (a file written in a ``replacing`` block) to disk and give it a new file's
    permissions (0666 less the umask): writers such as safetensors create 0600, and a shared
    artifact or export should be readable like any other file."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Write ``path`` whole or not at all: the block writes the yielded temporary file, which then
    replaces ``path`` (``os.replace``, atomic on one file system); on any failure it is removed and
    ``path`` is left as it was. Write failures become one ``UserError`` naming ``path`` (``writing``).

    Example::

        with replacing(out / "loss_history.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with writing(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def write_text_whole(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through ``replacing``; return the path."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
