"""One training job at a time, in a child process: ``python -m lowmcgm.cli run ...``.

A child process, not a thread: stopping it is the CLI's own stop (a checkpoint is written and
``--resume`` continues), its memory (the GPU's included) is freed when it ends, and a crash in
training cannot take the page down. The page stops it with SIGTERM, which the CLI treats as Ctrl-C:
never SIGINT, which a shell's background job (``nohup lowmcgm ui ... &``) starts ignored and
hands on, ignored, to the child. The job's state is read back from the run folder: the
progress events (``--events``), previews, and the last ``error:`` line the CLI printed.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lowmcgm.console.progress import read_events
from lowmcgm.errors import UserError
from lowmcgm.runs.folder import CHECKPOINT_NAME
from lowmcgm.runs.signals import route_stop_signals
from lowmcgm.ui.workspace import EARLIER_EVENTS_FILE, EVENTS_FILE, LOG_FILE

# A stop waits this long for the step in progress and the checkpoint before it kills the child.
STOP_TIMEOUT_S = 120.0
ERROR_PREFIX = "error: "  # every refusal of the CLI, argparse's included (console.arguments.Parser)


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
        self.killed_after_s: float | None = None  # set when a stop had to kill the child
        self.started_at: float | None = None  # time.monotonic() at start
        self.phase2_steps: int | None = None  # the run's, once its config.toml is read (the whole run's ETA)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # events.jsonl holds this attempt's events only (what a stop did is read from it); earlier
        # attempts' go on in EARLIER_EVENTS_FILE, for the loss curve of the whole run.
        events = self.folder / EVENTS_FILE
        if events.is_file():
            with open(self.folder / EARLIER_EVENTS_FILE, "ab") as earlier:
                earlier.write(events.read_bytes().rstrip(b"\n") + b"\n")
            events.unlink()
        self.started_at = time.monotonic()
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

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop as Ctrl-C does (a checkpoint after this step, then exit); kill only if it does not end in time.

        SIGTERM, not SIGINT: the CLI stops the same way for both (``signals``), but SIGINT may have
        been inherited as ignored (a server started in the background), SIGTERM is not.
        """
        if not self.running() or self.stop_requested:
            return  # a second SIGTERM would mean "stop now, without a checkpoint" to the trainer
        self.stop_requested = True
        self.process.send_signal(signal.SIGTERM)
        threading.Thread(target=self._kill_after, args=(timeout_s,), daemon=True).start()

    def _kill_after(self, timeout_s: float) -> None:
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.killed_after_s = timeout_s
            self.process.kill()

    def wait(self, timeout_s: float | None = None) -> int:
        return self.process.wait(timeout_s)

    def status(self) -> JobStatus:
        events = read_events(self.folder / EVENTS_FILE)
        history = loss_history([*read_events(self.folder / EARLIER_EVENTS_FILE), *events])
        previews = sorted((self.folder / "previews").glob("step*.png"))
        newest = [p for p in previews if not p.stem.endswith("-attention")][-1:]
        newest += [p.with_name(f"{p.stem}-attention.png") for p in newest
                   if p.with_name(f"{p.stem}-attention.png").is_file()]
        code = None if self.process is None else self.process.poll()
        if self.process is None:
            state, text = "idle", "Not started."
        elif code is None:
            if self.phase2_steps is None:  # read once it is written, not at every redraw
                self.phase2_steps = _phase2_steps(self.folder)
            steps = [e for e in events if e.get("kind") == "step"]
            steps_after = (self.phase2_steps or 0) if steps and steps[-1]["phase"] == 1 else 0
            state, text = "running", _progress_text(events, time.monotonic() - (self.started_at or time.monotonic()),
                                                    steps_after)
        elif code == 0:
            state, text = "finished", "Finished: the artifact and samples are written; go on to Pose and sample."
        elif self.stop_requested:
            state, text = "stopped", self._stopped_text(events)
        else:
            state, text = "failed", last_error(self.folder / LOG_FILE) or f"Training failed (exit code {code})."
        return JobStatus(state, text, history, newest)


    def _stopped_text(self, events: list[dict[str, Any]]) -> str:
        """What a stop did, read from the run: whether this attempt wrote its artifact or checkpoint."""
        if _saved(events, "artifact"):
            return ("Stopped after training, while drawing the run's samples: the artifact is written, so Pose "
                    "and sample opens it. Resume would draw the samples again.")
        steps = [e for e in events if e.get("kind") == "step"]
        at = f" at phase {steps[-1]['phase']}, step {steps[-1]['step']}" if steps else " before its first step"
        if _saved(events, "checkpoint"):
            return f"Stopped{at}; its checkpoint is written: Resume continues from it."
        earlier = ("Resume continues from the last checkpoint written before."
                   if (self.folder / CHECKPOINT_NAME).is_file() else "There is no checkpoint: start the run again.")
        if self.killed_after_s is not None:
            return f"Killed{at}: it had not stopped {self.killed_after_s:.0f} s after Stop, so no checkpoint. {earlier}"
        return f"Stopped{at}, without writing a checkpoint. {earlier}"


def _saved(events: list[dict[str, Any]], what: str) -> bool:
    return any(e.get("kind") == "saved" and e.get("what") == what for e in events)


def loss_history(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loss-curve rows of a run's events, over every attempt in order: a resumed attempt's
    ``phase`` event (its start step) drops the rows after that step, which it trains again."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for e in events:
        if e.get("kind") == "phase":
            resumed_at = (e["phase"], e.get("start", 0))
            rows = {key: row for key, row in rows.items() if key <= resumed_at}
        elif e.get("kind") == "step":
            rows[(e["phase"], e["step"])] = {"phase": e["phase"], "step": e["step"], **e["losses"]}
    return [rows[key] for key in sorted(rows)]


def _phase2_steps(folder: Path) -> int | None:
    """The run's phase 2 step count, from the config.toml its command writes (None until then)."""
    try:
        with open(folder / "config.toml", "rb") as fh:
            return int(tomllib.load(fh)["train"]["phase2_steps"])
    except (OSError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return None


def _progress_text(events: list[dict[str, Any]], elapsed_s: float = 0.0, steps_after: int = 0) -> str:
    """The running job's line: what it does now, and how long the whole run has left."""
    if _saved(events, "artifact"):  # lowmcgm run samples after training, which takes a while on a CPU
        images = [e["what"] for e in events if e.get("kind") == "saved" and str(e.get("what")).startswith("image ")]
        done = f" ({images[-1]} written)" if images else ""
        return f"Trained: the artifact is written, so Pose and sample opens it. Drawing the run's samples{done}..."
    steps = [e for e in events if e.get("kind") == "step"]
    if not steps:  # loading a real base model takes a while: say for how long it has
        return f"Starting ({elapsed_s:.0f} s): loading the base model and checking the inputs..."
    e = steps[-1]
    rate = e.get("it_per_s") or 0.0
    left_s = (e["total"] - e["step"] + steps_after) / rate if rate > 0 else math.inf
    # Phase 2 steps (the LoRA too) run slower than phase 1's: during phase 1 this is a lower bound.
    eta_text = f", about {_minutes(left_s)} of training left, then the run's samples" if math.isfinite(left_s) else ""
    return (f"Phase {e['phase']}: step {e['step']}/{e['total']}, loss {e['losses']['total']:.4f}, "
            f"{rate:.2f} it/s{eta_text}.")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def last_error(log: Path) -> str:
    """The CLI's one-line error (``error: ...``) from a job's log, or ''."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return next((line[len(ERROR_PREFIX):] for line in reversed(lines) if line.startswith(ERROR_PREFIX)), "")


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
        return self.start_prepared(lambda: argv, folder)

    def start_prepared(self, prepare: Callable[[], list[str]], folder: Path) -> TrainingJob:
        """Start the job whose command ``prepare()`` makes (writing its run folder), if no job runs.

        Checking, preparing and starting hold the slot together: a Resume clicked meanwhile waits,
        rather than taking the slot after a new run's folder was written for nothing.
        """
        with self.lock:
            self.check_free()
            self.job = TrainingJob(prepare(), folder)
            self.job.start()
            return self.job

    def training(self, run_name: str) -> bool:
        """Whether the job running now trains run ``run_name``."""
        job = self.job
        return job is not None and job.running() and job.folder.name == run_name

    def stop(self) -> str:
        """Ask the running job to stop; return what the page says about it (the truth, job or not)."""
        with self.lock:
            if self.job is None:
                return "No training job has been started here: nothing to stop."
            if not self.job.running():
                return f"Run '{self.job.folder.name}' is not training ({self.job.status().state}): nothing to stop."
            self.job.stop()
            return (f"Stopping run '{self.job.folder.name}': it finishes its step and writes a checkpoint; the "
                    "status below says when it has.")

    def close(self, timeout_s: float = STOP_TIMEOUT_S) -> str:
        """The page is closing: stop a running job and wait for it (at most ``timeout_s``, then kill it).

        Call it from the main thread: while it waits, a further stop signal to the page (Ctrl-C
        again, a supervisor repeating SIGTERM) goes on to the child, where a second one means "stop
        now, without a checkpoint" as it does for the CLI, instead of ending the wait and leaving
        the child to finish unseen.

        Returns:
            What became of the job, for the terminal ('' when none ran).
        """
        with self.lock:
            job = self.job
        if job is None or not job.running():
            return ""
        with route_stop_signals(lambda signum, _frame: job.process.send_signal(signum)):
            job.stop(timeout_s)
            with contextlib.suppress(subprocess.TimeoutExpired):  # the stop's own timer kills it first
                job.wait(timeout_s + 10)
        return f"Training run '{job.folder.name}': {job.status().text}"
