"""Tab 2, train: the memory estimate, starting, stopping and resuming the run's training job, and
what the page shows of it (status line, newest preview and attention maps, loss curve)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowmcgm.config import config_field
from lowmcgm.errors import UserError
from lowmcgm.ui.page_state import MAX_SUBJECTS, PageState, error_text, shown
from lowmcgm.ui.subjects_tab import handle_of, subject_masks
from lowmcgm.ui.workspace import (EVENTS_FILE, Subject, TrainRequest, overlap_warnings, prepare_run, resume_command,
                                  run_folder)


def on_estimate(state: PageState, preset: str, base_model: str):
    """The memory estimator's figures for a preset and base model (not a guess)."""
    from lowmcgm.config import resolve_config
    from lowmcgm.memory.estimate import estimate, required_card_bytes

    try:
        state.check_base_model(base_model)
        cfg = resolve_config(preset, None, {"model.base_model": base_model})
        est = estimate(cfg, base_model, timeout_s=300)
    except UserError as exc:
        return error_text(exc)
    # Named as the page offers it: ``est.model`` is the resolved model, for the toy one a path inside the package.
    lines = [f"**Estimated peak GPU memory** (base model {base_model}, preset {preset}, {est.resolution} px, "
             "traced on fake CUDA tensors):"]
    lines += [f"- phase {p.phase}: {p.peak_bytes / 2**30:.2f} GiB" for p in est.phases]
    lines.append(f"- card needed: {required_card_bytes(est.peak_bytes) / 2**30:.1f} GiB")
    return "\n".join(lines)


def start_training(state: PageState, photo, count, run_name, preset, base_model, preview_every, phase1_steps,
                   phase2_steps, *rest) -> str:
    editors = rest[:MAX_SUBJECTS]
    uploads = rest[MAX_SUBJECTS:2 * MAX_SUBJECTS]
    handles = rest[2 * MAX_SUBJECTS:3 * MAX_SUBJECTS]
    words = rest[3 * MAX_SUBJECTS:4 * MAX_SUBJECTS]
    count = int(count)
    try:
        state.jobs.check_free()  # before the masks are read: a busy slot says so first
        masks = subject_masks(photo, count, list(editors), list(uploads))
        subjects = tuple(Subject(handle_of(handles, i), words[i] or "", masks[i]) for i in range(count))
        every = preset_preview_every(preset) if preview_every is None else int(preview_every)  # a cleared box
        steps = [None if n is None else int(n) for n in (phase1_steps, phase2_steps)]  # None: the preset's
        request = TrainRequest(run_name, photo, subjects, preset, state.check_base_model(base_model), every, *steps)
        state.jobs.start_prepared(lambda: prepare_run(state.root, request), run_folder(state.root, run_name))
    except UserError as exc:
        return error_text(exc, [photo, *uploads])
    return shown(" ".join([f"Started run '{run_name}'.", *overlap_warnings(subjects)]))


def preset_preview_every(preset: str) -> int:
    """The preset's ``output.preview_every``: what the page's box shows until the user changes it."""
    from lowmcgm.config import resolve_config

    try:
        return resolve_config(preset, None, {}).output.preview_every
    except UserError:  # an unreadable preset: Start says why
        return config_field("output.preview_every")[0].default


def preset_steps(preset: str) -> tuple[int | None, int | None]:
    """The preset's phase 1 and phase 2 step counts: what the page's boxes show until the user
    changes them (None, a blank box, for a preset that cannot be read: Start says why)."""
    from lowmcgm.config import resolve_config

    try:
        train = resolve_config(preset, None, {}).train
    except UserError:
        return None, None
    return train.phase1_steps, train.phase2_steps


def resume_training(state: PageState, run_name: str) -> str:
    try:
        argv = resume_command(state.root, run_name)
        state.jobs.start(argv, run_folder(state.root, run_name))
    except UserError as exc:
        return error_text(exc)
    return shown(f"Resuming run '{run_name}'.")


def poll_key(state: PageState) -> tuple:
    """What ``poll_training`` shows depends on, cheaply read: the job, its process, its stop, and
    when its events and previews last changed. Equal keys: nothing to redraw."""
    job = state.jobs.job
    if job is None:
        return ()
    stamps = [path.stat().st_mtime_ns if path.exists() else 0
              for path in (job.folder / EVENTS_FILE, job.folder / "previews")]
    return (id(job), job.process.poll() if job.process is not None else "unstarted", job.stop_requested,
            job.killed_after_s, *stamps)


def poll_training(state: PageState):
    """The job's line, newest preview and attention picture, and the loss curve so far."""
    from lowmcgm.sampling.previews import render_loss_curve

    job = state.jobs.job
    if job is None:
        return "No training job yet.", None, None, None
    status = job.status()
    previews = [shown_large(p) for p in status.previews]
    curve = np.asarray(render_loss_curve(status.history)) if status.history else None
    return (f"**{status.state}**: {shown(status.text)}", previews[0] if previews else None,
            previews[1] if len(previews) > 1 else None, curve)


# A preview smaller than this is shown enlarged (a 64 px sample was a thumbnail in a wide box).
PREVIEW_MIN_PX = 256


def shown_large(path: Path) -> np.ndarray | None:
    """The picture at ``path``, enlarged by a whole factor (nearest: its pixels stay as they are)
    until its short side is at least ``PREVIEW_MIN_PX``; None if it cannot be read (being written)."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            picture = picture.convert("RGB")
    except (OSError, ValueError):
        return None
    factor = max(1, -(-PREVIEW_MIN_PX // min(picture.size)))
    return np.asarray(picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST))
