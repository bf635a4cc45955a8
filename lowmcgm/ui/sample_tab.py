"""Tab 3, pose and sample: opening a run (or an uploaded artifact), each handle's pose (drawn,
picked from the library, or uploaded), sampling, and the exports."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from lowmcgm.data import build_prompt
from lowmcgm.errors import UserError
from lowmcgm.interop.export import MASK_ENCODER_NOTE
from lowmcgm.runs.output import remove_empty_folders
from lowmcgm.toy.scenes import save_mask
from lowmcgm.ui import require_gradio
from lowmcgm.ui.editor import BLANK_SIDE, blank_sheet, editor_value, fit_mask, pose_on_canvas, sheet_with
from lowmcgm.ui.page_state import MAX_SUBJECTS, PageState, error_text, shown
from lowmcgm.ui.poses import pose_mask
from lowmcgm.ui.workspace import ARTIFACT_NAME, new_folder, run_folder


def run_artifact(state: PageState, run_name: str) -> Path:
    if not run_name:
        raise UserError("No run chosen: pick one under 'Run', or train one first.")
    path = run_folder(state.root, run_name) / ARTIFACT_NAME
    if not path.is_file():
        raise UserError(f"Run '{run_name}' has no artifact yet: finish (or resume) its training first.")
    return path


def on_open_run(state: PageState, run_name: str, prompt: str = ""):
    """The run's handles on the pose canvases; the prompt typed so far, or the training prompt.

    Returns the message, the prompt, then per canvas slot: whether it shows, and its label; last,
    the run waiting for its artifact (it is opened again when the artifact appears), or None.
    """
    from lowmcgm.artifact import load_artifact

    closed = [*[False] * MAX_SUBJECTS, *[""] * MAX_SUBJECTS]
    if not run_name:  # none picked (yet, or any more after Refresh): nothing to say
        return ["", prompt, *closed, None]
    try:
        if state.jobs.training(run_name) and not (run_folder(state.root, run_name) / ARTIFACT_NAME).is_file():
            return [shown(f"Run '{run_name}' is training: it opens here by itself when its artifact is written."),
                    prompt, *closed, run_name]
        handles = list(load_artifact(run_artifact(state, run_name)).handles)
    except UserError as exc:
        return [error_text(exc), prompt, *closed, None]
    labels = [f"Pose of {handles[i]}" if i < len(handles) else "" for i in range(MAX_SUBJECTS)]
    return [shown(f"Run '{run_name}': handles {', '.join(handles)}."), prompt or build_prompt(handles),
            *[i < len(handles) for i in range(MAX_SUBJECTS)], *labels, None]


def open_run_outputs(state: PageState, run_name: str, prompt: str) -> list[Any]:
    """``on_open_run`` as the page's outputs: the message, the prompt, the canvases' visibility and
    labels, the run waited for.

    The prompt is written only when opening the run fills it in: ``prompt`` is what the browser
    sent when the event was queued (behind a training tick, a second or more before it runs), and
    writing it back would undo what was typed since.
    """
    gr = require_gradio()
    message, text, *rest = on_open_run(state, run_name, prompt)
    visible, labels, waiting = rest[:MAX_SUBJECTS], rest[MAX_SUBJECTS:2 * MAX_SUBJECTS], rest[-1]
    return [message, gr.update() if text == prompt else text, *[gr.update(visible=v) for v in visible],
            *[gr.update(label=t) for t in labels], waiting]


def reopen_when_trained(state: PageState, waiting: str | None) -> bool:
    """Whether the run the Sample tab waits for has its artifact now (or stopped training without one)."""
    if not waiting:
        return False
    return (run_folder(state.root, waiting) / ARTIFACT_NAME).is_file() or not state.jobs.training(waiting)


def on_upload_artifact(state: PageState, path: str | None):
    """Put an uploaded artifact into a run folder of its own, so it can be opened like a run."""
    from lowmcgm.artifact import load_artifact

    if not path:
        return "", None
    try:
        load_artifact(Path(path))
        folder = new_folder(state.root, "uploaded-" + time.strftime("%Y%m%d-%H%M%S"))
        name = folder.name
        shutil.copyfile(path, folder / ARTIFACT_NAME)
    except UserError as exc:
        return error_text(exc, [path]), None
    return shown(f"Artifact uploaded as run '{name}'."), name


def sample(state: PageState, run_name, prompt, base_model, num_images, seed, steps, guidance_scale, pose_guidance,
           *poses):
    """Draw the prompt with each handle's pose (uploaded, painted, or none).

    ``poses``: per canvas slot the canvas, then per slot the upload, then per slot the pose library's pick.
    A pick is part of the pose even if its canvas has not been redrawn yet (a Sample click right after
    a pick may carry the canvas from before it).

    Returns:
        The message; the new images as (file, caption) pairs, each caption saying run, seed, steps,
        guidance and poses (None when refused: the gallery keeps what it shows); the poses used.
    """
    from lowmcgm.artifact import load_artifact
    from lowmcgm.config import SampleSettings
    from lowmcgm.sampling.prompts import Pose, PromptSpec, handles_in_text, normalize_handle
    from lowmcgm.sampling.sampler import sample_artifact

    try:
        artifact_path = run_artifact(state, run_name)
        artifact = load_artifact(artifact_path)
        handles = list(artifact.handles)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = artifact_path.parent
        pose_files, used, described = {}, [], []
        pose_dir = None
        drawn, uploaded, picked = poses[:MAX_SUBJECTS], poses[MAX_SUBJECTS:2 * MAX_SUBJECTS], poses[2 * MAX_SUBJECTS:]
        named, unposed = handles_in_text(prompt), []
        for handle, value, upload, pick in zip(handles, drawn, uploaded, picked):
            mask = with_library_pose(pose_on_canvas(value), pick)
            if handle not in named:  # a canvas still posed for an earlier prompt
                if upload or mask is not None:
                    unposed.append(handle)
                continue
            if upload:  # checked by the sampler, as --pose files are
                pose_files[normalize_handle(handle)] = upload
                used.append((upload, f"pose of {handle}"))
                described.append(f"{handle} uploaded")
            elif mask is not None:  # the sampler takes the array; the file is the record shown beside the images
                pose_dir = pose_dir or new_folder(folder / "ui-poses", stamp)
                record = save_mask(mask, pose_dir / f"{handle.strip('<>')}.png")
                pose_files[normalize_handle(handle)] = Pose(mask, record)
                used.append((record, f"pose of {handle}"))
                described.append(f"{handle} {pick or 'drawn'}")
        settings = SampleSettings(num_images=int(num_images), seed=int(seed), steps=int(steps),
                                  guidance_scale=float(guidance_scale), pose_guidance=pose_guidance)
        with state.sampling:
            base = state.base_for(artifact_path, artifact, base_model or "")
            out = new_folder(folder / "ui-samples", stamp)
            said: list[str] = []  # the library's messages: a prompt naming no handle, an old SDXL artifact, ...

            def report(event: dict) -> None:
                if event["kind"] == "message":
                    said.append(("warning: " if event.get("level") == "warning" else "") + f"{event['text']} ")
            try:
                grid = sample_artifact(artifact_path, [PromptSpec(prompt, where="the prompt")], pose_files, settings,
                                       out, base=base, report=report)
            finally:
                remove_empty_folders(out)  # a refused (or failed) sample leaves no empty folder
    except UserError as exc:
        return error_text(exc, poses[MAX_SUBJECTS:2 * MAX_SUBJECTS]), None, []
    index = json.loads((grid.parent / "samples.json").read_text())
    posed = "; ".join(described) or "no poses"
    images = [(str(grid.parent / im["file"]),
               f"{run_name} · seed {im['seed']} · {settings.steps} steps · guidance {settings.guidance_scale:g} · "
               f"{pose_guidance} · {posed}")
              for p in index["prompts"] for im in p["images"]]
    warning = "".join(said)
    if unposed:
        warning += f"The poses of {', '.join(unposed)} are left out: the prompt does not name them. "
    return shown(f"{warning}{len(images)} image(s) in {out}."), images, used


def export(state: PageState, run_name: str, fmt: str):
    """The artifact in another tool's format, as one downloadable file (folders are zipped)."""
    from lowmcgm.interop.export import export_artifact

    try:
        artifact_path = run_artifact(state, run_name)
        exports = artifact_path.parent / "exports"
        target = exports / (f"{run_name}-kohya.safetensors" if fmt == "kohya" else fmt)
        result = export_artifact(artifact_path, fmt, target, force=True)
    except UserError as exc:
        return error_text(exc), None
    if fmt == "kohya":
        return shown(f"kohya LoRA for {', '.join(result.handles)}. {MASK_ENCODER_NOTE}"), str(result.files[0])
    archive = shutil.make_archive(str(exports / f"{run_name}-{fmt}"), "zip", target)
    return shown(f"{fmt} export ({len(result.files)} files, zipped). {MASK_ENCODER_NOTE}"), archive


def with_library_pose(mask: np.ndarray | None, pick: str | None) -> np.ndarray | None:
    """A canvas's mask joined with the pose library's pick (as the canvas shows it, once redrawn)."""
    if not pick:
        return mask
    height, width = mask.shape if mask is not None else (BLANK_SIDE, BLANK_SIDE)
    library = fit_mask(pose_mask(pick), height, width)  # what sheet_with draws, read back
    return library if mask is None else mask | library


def on_pose_library(name: str | None):
    """A fresh canvas showing the library's pose (a blank one for none); strokes may be added."""
    return editor_value(sheet_with(pose_mask(name)) if name else blank_sheet())
