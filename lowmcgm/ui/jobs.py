"""One training job at a time, in a child process: ``python -m lowmcgm.cli run ...``.

A child process, not a thread: stopping it is the CLI's own Ctrl-C (SIGINT: a checkpoint is written
and ``--resume`` continues), its memory (the GPU's included) is freed when it ends, and a crash
in training cannot take the page down. The job's state is read back from the run folder: the
progress events (``--events``), previews, and the last ``error:`` line the CLI printed.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowmcgm.errors import UserError
from lowmcgm.progress import read_events
from lowmcgm.ui.workspace import EVENTS_FILE, LOG_FILE


@dataclass(frozen=True)
class JobStatus:
    """What the page shows about a job."""

    state: str  # "idle", "running", "finished", "stopped" or "failed"
    text: str  # one line for people
    history: list[dict[str, Any]] = field(default_factory=list)  # loss-curve rows so far
    previews: list[Path] = field(default_factory=list)  # the newest preview and its attention picture


class TrainingJob:
    """The child process of one ``lowmcgm run``; ``status()`` reads its folder."""

    def __init__(self, argv: list[str], folder: Path):
        self.argv = list(argv)
        self.folder = Path(folder)
        self.process: subprocess.Popen | None = None
        self.stop_requested = False

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / EVENTS_FILE).unlink(missing_ok=True)  # events of this attempt only
        log = open(self.folder / LOG_FILE, "w", encoding="utf-8")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Its own process group: a Ctrl-C in the page's terminal stops the page, and the page stops
        # the job, rather than both at once.
        self.process = subprocess.Popen([sys.executable, "-m", "lowmcgm.cli", *self.argv], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
        log.close()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 120.0) -> None:
        """Stop as Ctrl-C does (a checkpoint, then exit); kill only if it does not end in time."""
        if not self.running():
            return
        self.stop_requested = True
        self.process.send_signal(signal.SIGINT)
        threading.Thread(target=self._kill_after, args=(timeout_s,), daemon=True).start()

    def _kill_after(self, timeout_s: float) -> None:
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def wait(self, timeout_s: float | None = None) -> int:
        return self.process.wait(timeout_s)

    def status(self) -> JobStatus:
        events = read_events(self.folder / EVENTS_FILE)
        history = [{"phase": e["phase"], "step": e["step"], **e["losses"]} for e in events if e.get("kind") == "step"]
        previews = sorted((self.folder / "previews").glob("step*.png"))
        newest = [p for p in previews if not p.stem.endswith("-attention")][-1:]
        newest += [p.with_name(f"{p.stem}-attention.png") for p in newest
                   if p.with_name(f"{p.stem}-attention.png").is_file()]
        code = None if self.process is None else self.process.poll()
        if self.process is None:
            state, text = "idle", "Not started."
        elif code is None:
            state, text = "running", _progress_text(events)
        elif code == 0:
            state, text = "finished", "Finished: the artifact and samples are written; go on to Pose and sample."
        elif self.stop_requested:
            state, text = "stopped", "Stopped; the last checkpoint is kept: Resume continues from it."
        else:
            state, text = "failed", last_error(self.folder / LOG_FILE) or f"Training failed (exit code {code})."
        return JobStatus(state, text, history, newest)


def _progress_text(events: list[dict[str, Any]]) -> str:
    steps = [e for e in events if e.get("kind") == "step"]
    if not steps:
        return "Starting: loading the base model..."
    e = steps[-1]
    eta = e.get("eta_s", math.inf)
    eta_text = f", about {eta / 60:.1f} min left in this phase" if math.isfinite(eta) else ""
    return (f"Phase {e['phase']}: step {e['step']}/{e['total']}, loss {e['losses']['total']:.4f}, "
            f"{e['it_per_s']:.2f} it/s{eta_text}.")


def last_error(log: Path) -> str:
    """The CLI's one-line error (``error: ...``) from a job's log, or ''."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    return ""


class JobSlot:
    """The page's one job (one GPU): a second start while one runs is refused."""

    def __init__(self):
        self.job: TrainingJob | None = None
        self.lock = threading.Lock()

    def check_free(self) -> None:
        """Refuse while a job runs (checked before a new run's folder is written, and at start)."""
        if self.job is not None and self.job.running():
            raise UserError(f"A training job is running ({self.job.folder.name}): stop it first.")

    def start(self, argv: list[str], folder: Path) -> TrainingJob:
        with self.lock:
            self.check_free()
            self.job = TrainingJob(argv, folder)
            self.job.start()
            return self.job

    def stop(self) -> None:
        with self.lock:
            if self.job is not None:
                self.job.stop()
