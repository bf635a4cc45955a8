"""Showing the trainer's progress events: a rich display on a terminal, plain lines otherwise, and
an optional JSON-lines log of the same events for programs (the web page reads it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


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
            self.console.print(f"{prefix}{event['text']}", markup=False, highlight=False)
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
            self.console.print(f"saved {event['what']}: {event['path']}", markup=False, highlight=False)


class EventLog:
    """Append each progress event to a file as one JSON line, flushed at once (a reader polls it).

    Values JSON cannot hold (paths) are written as strings.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")

    def __call__(self, event: dict[str, Any]) -> None:
        self.file.write(json.dumps(event, default=str) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


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
