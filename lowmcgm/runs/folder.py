"""One run per output folder: refusing a folder that holds another run, and a lock for the whole run.

A training folder holds one run: its artifact, config.toml, loss history, checkpoint, previews and
samples. A new run there would replace some of them and keep others (the other run's checkpoint,
which a later ``--resume`` would then continue), so it is refused unless ``--resume`` (continue
it) or ``--overwrite`` (replace it: its files are removed once the new run has passed every check,
before the first write). A sample folder follows the same rule for earlier samples. Only what
lowmcgm writes counts, and only that is removed: files of the user's own in ``samples/`` or
``previews/`` neither make a folder "another run" nor go with it.

While a command runs it holds ``.lowmcgm.lock`` in its folder (``flock``: the kernel releases it
when the process dies, even by SIGKILL, so a crash never leaves a stale lock); a second command
on the same folder gets one line naming the process that holds it.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from lowmcgm.errors import UserError
from lowmcgm.runs.write_guard import check_writable_folder, same_file

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder rule still applies, the lock does not
    fcntl = None

LOCK_NAME = ".lowmcgm.lock"
CHECKPOINT_NAME = "checkpoints/last.safetensors"
# What a run writes besides its artifact (output.artifact_name): files, then folders of files.
RUN_FILES = ("config.toml", "loss_history.json", "loss_curve.png", CHECKPOINT_NAME)
RUN_FOLDERS = ("previews", "samples", "checkpoints")
# What `sample` writes: the contact sheet, the index, and p<prompt>-<image>-seed<seed>.png, whose
# numbers grow past their padding (sampler._image_name: prompt 100, image 1000).
SAMPLE_FILES = ("grid.png", "samples.json")
SAMPLE_IMAGE = re.compile(r"p\d{2,}-\d{3,}-seed\d+\.png")
# What the previews of `run` write (sampling.training_previews.TrainingPreviews): step<n>.png and step<n>-attention.png.
PREVIEW_IMAGE = re.compile(r"step\d{5,}(-attention)?\.png")


def run_files(out: Path, artifact_name: str) -> list[Path]:
    """The files a training run in ``out`` writes (its folders are ``RUN_FOLDERS``)."""
    return [out / artifact_name] + [out / name for name in RUN_FILES]


def earlier_run(out: Path, artifact_name: str) -> list[Path]:
    """What another run left in ``out``: the files a run writes, in ``out`` and in its folders."""
    found = [p for p in run_files(out, artifact_name) if p.exists() or p.is_symlink()]
    found += [p for p in sorted((out / "previews").glob("step*.png")) if PREVIEW_IMAGE.fullmatch(p.name)]
    found += earlier_samples(out / "samples")
    return list(dict.fromkeys(found))


def check_run_folder(out: Path, artifact_name: str, resume: bool, overwrite: bool) -> None:
    """Refuse a folder holding another run, unless continuing it (``resume``) or replacing it."""
    if resume and overwrite:
        raise UserError("--resume continues the run in the output folder and --overwrite replaces it: pass one.")
    found = earlier_run(Path(out), artifact_name)
    if found and not (resume or overwrite):
        names = ", ".join(str(p.relative_to(out)) for p in found[:4])
        raise UserError(f"Output folder {out} holds another run ({names}): pass --resume to continue it, "
                        "--overwrite to replace it, or choose another --out.")


def clear_earlier_run(out: Path, artifact_name: str) -> None:
    """Remove what another run left (``--overwrite``): only the files a run writes, then those of
    its folders left empty; the user's own files stay, and keep their folder."""
    for path in earlier_run(Path(out), artifact_name):
        path.unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        with contextlib.suppress(OSError):  # a folder still holding the user's files stays
            (Path(out) / name).rmdir()


def earlier_samples(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [folder / n for n in SAMPLE_FILES if (folder / n).exists()] + sorted(
        p for p in folder.glob("p*-seed*.png") if SAMPLE_IMAGE.fullmatch(p.name))


def check_sample_folder(folder: Path, overwrite: bool) -> None:
    """Refuse a folder with earlier samples unless ``overwrite``: new images would mix with them."""
    found = earlier_samples(folder)
    if found and not overwrite:
        raise UserError(f"Output folder {folder} holds earlier samples ({found[0].name} and {len(found) - 1} more "
                        "files): pass --overwrite to replace them, or choose another --out.")


def clear_earlier_samples(folder: Path) -> None:
    for path in earlier_samples(folder):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def hold_folder(folder: str | Path) -> Iterator[Path]:
    """Hold ``<folder>/.lowmcgm.lock`` while the block runs; refuse when another process holds it.

    Creates ``folder`` when missing (the CLI removes it again if the command fails before writing
    a file). The lock file is removed on the way out.
    """
    folder = check_writable_folder(Path(folder).expanduser())
    if fcntl is None:
        yield folder
        return
    path = folder / LOCK_NAME
    fd = _lock(path, folder)
    try:
        yield folder
    finally:
        # Unlink while still holding it: a process that opens the name after this gets a new file.
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _lock(path: Path, folder: Path) -> int:
    for _ in range(3):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"Output folder {folder} is in use by another lowmcgm command (process {holder}): "
                            "wait for it to finish, or choose another --out.") from None
        # The holder before us may have unlinked the name between our open and our lock: then the
        # lock is on a file nobody else will open; take the one at the name instead.
        if same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise UserError(f"Output folder {folder} is in use by other lowmcgm commands: choose another --out.")
