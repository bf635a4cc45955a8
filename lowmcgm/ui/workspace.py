"""Run folders under the page's root, the inputs written into them, and the command that trains.

The page never takes a server-side path from the browser: uploads arrive as files, and a run is
named by a plain folder name that must lie directly under the root given on the command line
(``lowmcgm ui --root``). A run folder holds what ``lowmcgm run`` writes plus:

- ``inputs/``: the photo and one mask per subject, as uploaded or painted;
- ``ui-run.json``: the training command's arguments, so the page can resume the run later;
- ``events.jsonl`` and ``ui-train.log``: the job's progress events and its terminal output;
- ``ui-events-earlier.jsonl``: the events of the attempts before a Resume (the whole loss curve).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowmcgm.config import Config
from lowmcgm.data import mask_overlap
from lowmcgm.errors import UserError
from lowmcgm.runs.command import RunCommand
from lowmcgm.runs.folder import CHECKPOINT_NAME
from lowmcgm.toy.scenes import save_mask  # the one mask writer (white on black, 8-bit)

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
COMMAND_FILE = "ui-run.json"
EVENTS_FILE = "events.jsonl"
EARLIER_EVENTS_FILE = "ui-events-earlier.jsonl"
LOG_FILE = "ui-train.log"
ARTIFACT_NAME = Config().output.artifact_name


@dataclass(frozen=True)
class Subject:
    """One subject as the page gives it: a handle, its initializer word and its mask."""

    handle: str
    init_word: str
    mask: np.ndarray  # (H, W) bool, the photo's size


@dataclass(frozen=True)
class TrainRequest:
    """What the page's training tab asks for."""

    run_name: str
    photo: str  # the uploaded file
    subjects: tuple[Subject, ...]
    preset: str
    base_model: str
    preview_every: int = 10
    phase1_steps: int | None = None  # None: the preset's
    phase2_steps: int | None = None


def overlap_warnings(subjects: tuple[Subject, ...]) -> list[str]:
    """One warning per two subjects whose masks share pixels: both handles would learn those pixels.

    A warning, not a refusal: a little overlap where two subjects touch is common when painting.
    The CLI warns only past ``data.OVERLAP_WARN_FRACTION`` of the smaller mask; the page shows
    any overlap, since a brush's spill onto a neighbour is easy to erase once it is pointed out.
    """
    warnings = []
    for i, j in itertools.combinations(range(len(subjects)), 2):
        share = mask_overlap(subjects[i].mask, subjects[j].mask)
        if share > 0:
            amount = f"{share:.0%}" if share >= 0.005 else "under 1%"
            warnings.append(f"warning: subjects {i + 1} ({subjects[i].handle}) and {j + 1} ({subjects[j].handle}) "
                            f"overlap on {amount} of the smaller mask: both handles learn those pixels; erase them "
                            "from one of the two.")
    return warnings


def default_run_name() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


def run_folder(root: Path, name: str) -> Path:
    """``root / name`` for a plain folder name; anything else (a path, '..') is refused."""
    name = (name or "").strip()
    if not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise UserError(f"Run name '{name}' is not a plain folder name: use letters, digits, '.', '_' and '-' "
                        "(at most 64, starting with a letter or digit).")
    folder = (Path(root) / name).resolve()
    if folder.parent != Path(root).resolve():
        raise UserError(f"Run name '{name}' leads outside the page's root folder {root}.")
    return folder


def new_folder(parent: Path, stem: str) -> Path:
    """A new, empty folder ``parent/stem`` (``stem-2``, ``stem-3``... when taken); created here.

    Names by the clock collide when two clicks land in one second: the first free name wins, and
    creating it claims it (``mkdir`` without ``exist_ok``), so two callers never share a folder.
    """
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = parent / (stem if n == 1 else f"{stem}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise UserError(f"{parent} holds 999 folders named {stem}*: clear some out.")


def list_runs(root: Path) -> list[str]:
    """Run folders under ``root`` that hold an artifact, a checkpoint or the page's command (a run
    started here, picked on the Sample tab while it trains), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and RUN_NAME.fullmatch(p.name)
            and any((p / name).is_file() for name in (ARTIFACT_NAME, CHECKPOINT_NAME, COMMAND_FILE))]
    return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def write_inputs(request: TrainRequest, photo: Path, masks: list[Path]) -> None:
    """Copy the photo to ``photo`` and write each subject's mask to its path in ``masks`` (``input_paths``)."""
    photo.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(request.photo, photo)
    for subject, mask in zip(request.subjects, masks):
        save_mask(subject.mask, mask)


def init_words(subjects: tuple[Subject, ...]) -> list[str]:
    """Every subject's initializer word, or none at all (the words are optional, but all or none)."""
    words = [s.init_word.strip() for s in subjects]
    if any(words) and not all(words):
        raise UserError("Give an initializer word for every subject, or for none.")
    return words if any(words) else []


def run_command(request: TrainRequest, folder: Path, photo: Path, masks: list[Path]) -> RunCommand:
    """The request as one ``lowmcgm run`` (without --resume / --overwrite): its ``config()`` is what
    the page checks before it starts, its ``command()`` what the child runs.

    Every value rides in its flag (``--init-word=--out=x``), so nothing a user typed can be read
    as a flag of its own; refusals name the settings, as the page's boxes are not flags.
    """
    inputs: list[tuple[str, Any]] = [("model.base_model", request.base_model), ("data.image", str(photo))]
    for subject, mask in zip(request.subjects, masks):
        inputs += [("data.masks", str(mask)), ("data.handles", subject.handle.strip())]
    inputs += [("data.init_words", word) for word in init_words(request.subjects)]
    outputs = (("output.out", str(folder)), ("output.preview_every", request.preview_every))
    return RunCommand(request.preset, tuple(inputs), outputs, overrides=tuple(step_settings(request).items()),
                      extra=(f"--events={folder / EVENTS_FILE}",), joined=True, named_by_key=True)


def step_settings(request: TrainRequest) -> dict[str, int]:
    """The step counts the request sets, as config keys (the preset's where it sets none)."""
    steps = {"train.phase1_steps": request.phase1_steps, "train.phase2_steps": request.phase2_steps}
    return {key: n for key, n in steps.items() if n is not None}


def input_paths(folder: Path, request: TrainRequest) -> tuple[Path, list[Path]]:
    """Where the photo and the masks go: ``folder/inputs/photo.<its suffix>``, ``mask0.png``, ..."""
    suffix = Path(request.photo).suffix.lower() or ".png"
    return folder / "inputs" / f"photo{suffix}", [folder / "inputs" / f"mask{i}.png" for i in range(len(request.subjects))]


def prepare_run(root: Path, request: TrainRequest) -> list[str]:
    """Check a request as ``lowmcgm run`` would, write its inputs, and return its command.

    Everything but the files is checked before the run's folder is made: the name, the photo, the
    handles and initializer words, the preset with every setting the command passes (resolved and
    validated as the command will resolve it: ``RunCommand.config``). ``trainer.check_inputs`` then reads the files
    as written; if it refuses them, the folder goes again.

    Raises:
        UserError: the same one-line messages as the CLI (a bad photo or mask, a handle name, a
            preset or setting out of range, a run name taken).
    """
    from lowmcgm.data import load_image
    from lowmcgm.handles import check_handle_names
    from lowmcgm.training.trainer import check_inputs

    if not request.subjects:
        raise UserError("No subjects: paint (or upload) one mask per subject.")
    init_words(request.subjects)
    load_image(request.photo)  # a bad upload is refused before anything is written
    folder = run_folder(root, request.run_name)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        kind = "" if folder.is_dir() else " (as a file in the page's root)"
        raise UserError(f"Run '{request.run_name}' exists already{kind}: choose another name, or open it to resume "
                        "or sample.")
    photo, masks = input_paths(folder, request)
    run = run_command(request, folder, photo, masks)
    cfg = run.config()
    check_handle_names(list(cfg.data.handles), len(cfg.data.masks))
    write_inputs(request, photo, masks)
    try:
        check_inputs(cfg)
    except UserError:
        shutil.rmtree(folder, ignore_errors=True)  # a refused run leaves nothing behind, as in the CLI
        raise
    argv = run.command()
    (folder / COMMAND_FILE).write_text(json.dumps(argv, indent=1) + "\n")
    return argv


def resume_command(root: Path, name: str) -> list[str]:
    """The command that continues a run the page started, from its last checkpoint."""
    folder = run_folder(root, name)
    try:
        argv = json.loads((folder / COMMAND_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise UserError(f"Run '{name}' was not started from the page (no {COMMAND_FILE}): resume it with "
                        "'lowmcgm run --resume' and its own arguments.") from exc
    if not (folder / CHECKPOINT_NAME).is_file():
        raise UserError(f"Run '{name}' has no checkpoint to resume from.")
    return [*argv, "--resume"]
