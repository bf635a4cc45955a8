"""Showing the trainer's progress events: a rich display on a terminal, plain lines otherwise, and
an optional JSON-lines log of the same events for programs (the web page reads it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lowmcgm.console.terminal import escape_controls
from lowmcgm.errors import UserError
from lowmcgm.runs.write_guard import check_not_inputs, check_writable_folder, inside_folder, same_file, writing


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


class ProgressPrinter:
    """A callable for ``train(on_progress=...)``; use as a context manager."""

    def __init__(self, console: Console | None = None, plain_every: int = 10):
        self.console = console or Console(stderr=True, soft_wrap=True)  # never break paths across lines
        self.live = self.console.is_terminal
        self.plain_every = plain_every
        self.progress: Progress | None = None
        self.task = None

    def __enter__(self) -> "ProgressPrinter":
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]phase {task.fields[phase]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[losses]}"), TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(), TextColumn("{task.fields[mem]}"), console=self.console)
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "message":
            prefix = "warning: " if event.get("level") == "warning" else ""
            self.console.print(escape_controls(f"{prefix}{event['text']}"), markup=False, highlight=False)
        elif kind == "phase":
            if self.progress is not None:
                if self.task is not None:
                    self.progress.remove_task(self.task)
                self.task = self.progress.add_task("train", total=event["total"], completed=event["start"],
                                                   phase=event["phase"], losses="", rate="", mem="")
            else:
                print(f"phase {event['phase']}: {event['total']} steps", file=sys.stderr, flush=True)
        elif kind == "step":
            losses = event["losses"]
            text = (f"loss {losses['total']:.4f} (rec {losses['rec']:.4f} attn {losses['attn']:.4f} "
                    f"mask-attn {losses['mask_attn']:.4f})")
            rate = f"{event['it_per_s']:.2f} it/s"
            mem = f"peak {_fmt_bytes(event['peak_bytes'])}"
            if self.progress is not None and self.task is not None:
                self.progress.update(self.task, completed=event["step"], losses=text, rate=rate, mem=mem)
            elif event["step"] % self.plain_every == 0 or event["step"] == event["total"]:
                print(f"phase {event['phase']} step {event['step']}/{event['total']} {text} {rate} {mem}",
                      file=sys.stderr, flush=True)
        elif kind == "saved":
            self.console.print(escape_controls(f"saved {event['what']}: {event['path']}"), markup=False,
                               highlight=False)


class EventLog:
    """Append each progress event to a file as one JSON line, flushed at once (a reader polls it).

    The file is an output like any other: ``check_event_log`` vets it before the command starts,
    it is opened (with its folders) only at the first event, which comes after the command's
    checks, and a refused command removes a file it created (``close(refused=True)``). Values JSON
    cannot hold (paths) are written as strings; a failed write is one ``UserError`` naming the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.file: TextIO | None = None
        self.created = False  # this log made the file (so a refused command may remove it)
        self.saved = False  # a "saved" event was logged: the file records something that stays

    def __call__(self, event: dict[str, Any]) -> None:
        with writing(self.path):
            if self.file is None:
                self.created = not self.path.exists()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8")
            self.file.write(json.dumps(event, default=str) + "\n")
            self.file.flush()
        self.saved = self.saved or event.get("kind") == "saved"

    def close(self, refused: bool = False) -> None:
        """Close the file; when the command was ``refused`` before saving anything, remove the file
        if this log created it (a refused command leaves nothing behind)."""
        file, self.file = self.file, None
        if file is not None:
            try:
                with writing(self.path):
                    file.close()
            except UserError:
                if not refused:  # already failing: that error is the one to report
                    raise
        if refused and self.created and not self.saved:
            self.path.unlink(missing_ok=True)


# How much of an existing --events file is read to tell an events log from any other file.
_EVENT_LOG_PEEK_BYTES = 64 * 2**10


def _is_event_log(path: Path) -> bool:
    """Whether ``path`` is empty or starts with an event line: what appending to it cannot damage."""
    with open(path, "rb") as fh:
        head = fh.read(_EVENT_LOG_PEEK_BYTES)
    if not head:
        return True
    line, newline, _ = head.partition(b"\n")
    try:
        first = json.loads(line) if newline else None
    except ValueError:
        return False
    return isinstance(first, dict) and "kind" in first


def check_event_log(path: str | Path, inputs: Iterable[str | Path], outputs: Iterable[str | Path],
                    folders: Iterable[str | Path] = ()) -> None:
    """Refuse an ``--events`` file that appending to would damage, before anything is written.

    Args:
        path: the file: a new one (its folder, or the nearest existing one above, must take a
            file), or an existing events log to add to.
        inputs: the files the command reads (the photo, masks, --config, ...).
        outputs, folders: the files the command writes, and folders it writes into.

    Raises:
        UserError: naming the file and what to do.
    """
    path = Path(path).expanduser()
    check_not_inputs([path], inputs)
    # Matched as check_not_inputs matches: resolved (``out/../out/x``, a symlink) or the same inode.
    if any(same_file(path, p) for p in outputs) or any(inside_folder(path, f) for f in folders):
        raise UserError(f"--events {path} is also an output of this command; choose another file for the events.")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise UserError(f"--events {path} is not a regular file; pass a new file, or an events log to add to.")
        try:
            if not _is_event_log(path):
                raise UserError(f"--events {path} exists and is not a lowmcgm events log (JSON lines); appending "
                                "would damage it: pass a new file.")
            open(path, "a").close()  # opened for appending, not written: the file stays as it is
        except OSError as exc:
            raise UserError(f"--events {path} cannot be written ({exc.strerror or exc}); choose another "
                            "file.") from exc
        return
    existing = next(p for p in path.absolute().parents if p.exists() or p.is_symlink())
    check_writable_folder(existing, flag="--events")


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of an ``EventLog`` so far; a line still being written is left for the next read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    events = []
    for line in text.split("\n")[:-1]:  # the last piece has no newline yet (or is empty)
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def tee(*callbacks: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None]:
    """One progress callback that calls each given one (None entries are skipped)."""
    chosen = [c for c in callbacks if c is not None]

    def call(event: dict[str, Any]) -> None:
        for callback in chosen:
            callback(event)

    return call
