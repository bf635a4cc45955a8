"""The gradio page: three tabs (photo and subjects, train, pose and sample) over the library.

Callbacks only translate between widgets and library calls; every ``UserError`` becomes the
message line of its tab (the CLI's one line, without a traceback). State that outlives a click
(the training job, the loaded base model) lives in ``PageState``, one per page process: the page
is for one person on one GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lowmcgm.config import config_field
from lowmcgm.console.terminal import escape_controls
from lowmcgm.data import build_prompt
from lowmcgm.errors import UserError
from lowmcgm.interop.export import FORMATS, MASK_ENCODER_NOTE
from lowmcgm.runs.output import remove_empty_folders
from lowmcgm.toy.scenes import save_mask
from lowmcgm.ui import require_gradio
from lowmcgm.ui.editor import (BLANK_SIDE, SUBJECT_COLOURS, blank_sheet, editor_value, fit_mask, overlay, painted_mask,
                               pose_on_canvas, sheet_with)
from lowmcgm.ui.jobs import JobSlot
from lowmcgm.ui.poses import pose_mask, pose_names
from lowmcgm.ui.workspace import (ARTIFACT_NAME, EVENTS_FILE, Subject, TrainRequest, default_run_name, list_runs,
                                  new_folder, overlap_warnings, prepare_run, resume_command, run_folder)

MAX_SUBJECTS = 4
# A brush a 24th of the photo's short side: a subject's outline in a few strokes, its edge still precise.
BRUSH_FRACTION = 24
POLL_S = 1.0
# Canvas columns sit two to a row, each half the row whatever the number shown (a grid, not a
# flex row): an ImageEditor keeps the canvas size it was laid out at, so columns that widened or
# narrowed when another subject's column appeared would leave their canvases off-centre and
# overflowing. A column is never narrower than this; a window too narrow for two shows one a row.
CANVAS_COLUMN_PX = 300
CANVAS_ROW_CLASS = "lowmcgm-canvases"
# Canvas height: a square photo fills a half-row column (about 600 px on a 1280 px window).
CANVAS_HEIGHT_PX = 520
# gradio 6.31's ImageEditor floats its brush palette over the canvas's left edge (its CSS:
# ``.toolbar-wrap {position: absolute; top: 30%; left: 15px; width: 30px}``; no ImageEditor option
# moves it), and a stroke that starts on the palette is the palette's, never painted. The drawing
# surface starts right of it instead: the photo's left edge can be painted from its first pixel.
PALETTE_STRIP_PX = 48
CANVAS_CLASS = "lowmcgm-canvas"
PAGE_CSS = f"""
.{CANVAS_CLASS} .pixi-target, .{CANVAS_CLASS} .pixi-target-crop {{
  left: {PALETTE_STRIP_PX}px !important; width: calc(100% - {PALETTE_STRIP_PX}px) !important;
}}
.{CANVAS_ROW_CLASS} {{ display: grid !important; grid-template-columns: repeat(2, minmax(0, 1fr)); }}
@media (max-width: {2 * CANVAS_COLUMN_PX + 100}px) {{
  .{CANVAS_ROW_CLASS} {{ grid-template-columns: minmax(0, 1fr); }}
}}
"""


@dataclasses.dataclass
class PageState:
    """What the page keeps between clicks."""

    root: Path
    # The base models the page offers (``lowmcgm ui --base-model``, repeatable): the only model
    # paths it reads, so a browser can neither open nor probe other server folders.
    base_models: tuple[str, ...] = ("toy",)
    jobs: JobSlot = dataclasses.field(default_factory=JobSlot)
    # (base model name, stored in fp8, the artifact's path for a full-mode one, else "") -> the one
    # loaded BaseModel (``base_for``)
    bases: dict[tuple[str, bool, str], Any] = dataclasses.field(default_factory=dict)
    sampling: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def check_base_model(self, name: str) -> str:
        """``name`` if the page offers it; otherwise say how to offer it."""
        if name not in self.base_models:
            raise UserError(f"Base model '{name}' is not one this page offers ({', '.join(self.base_models)}): "
                            f"start the page with --base-model {name} to offer it.")
        return name

    def base_model_of(self, artifact: Any, chosen: str) -> str:
        """The base model to sample ``artifact`` on: ``chosen``, else the one it was trained on, if offered."""
        from lowmcgm.sampling.sampler import recorded_base_model

        if chosen:
            return self.check_base_model(chosen)
        recorded, _ = recorded_base_model(artifact)
        if recorded in self.base_models:
            return recorded
        raise UserError(f"This artifact was trained on base model '{recorded}', which this page does not offer: "
                        f"pick one under 'Base model', or start the page with --base-model {recorded}.")

    def base_for(self, artifact_path: Path, artifact: Any, chosen: str):
        """The base model to sample ``artifact`` on (``base_model_of``), loaded once per page.

        Sampling hands the base back without the artifact's state (``sampler.sample_artifact``), so
        the next sample, of this artifact or another, installs on it cleanly. Two things stay on it
        for good: a UNet (text encoders) stored in fp8 for an artifact trained with ``model.fp8_base``
        (``model.fp8_text_encoders``; ``sampler.build_sampler``), and the whole weights of a ``full``-mode artifact
        (``MCGMState.remove``): such an artifact keeps a base of its own.
        """
        from lowmcgm.sampling.sampler import load_base_for, trained_with_fp8

        name = self.base_model_of(artifact, chosen)
        full = (artifact.meta.get("lora") or {}).get("mode") == "full"
        key = (name, trained_with_fp8(artifact), str(artifact_path) if full else "")
        if key not in self.bases:
            self.bases.clear()  # one base in memory at a time
            # "" loads the recorded base as training read it (a single file with its shipped config).
            self.bases[key] = load_base_for(artifact, chosen)
        return self.bases[key]


def error_text(exc: UserError, uploads: Iterable[str | None] = ()) -> str:
    """The CLI's line for ``exc``, as the page shows it (see ``shown``).

    ``uploads``: the files of the action, as gradio hands them over: its copies under
    ``<root>/.gradio-cache/<hash>/``. Each is named as the user knows it, by its own file name
    (the copy's last path part), not by a path the user never saw.
    """
    text = " ".join(str(exc).splitlines())
    for path in sorted({str(p) for p in uploads if p}, key=len, reverse=True):  # a longer path first
        text = text.replace(path, Path(path).name)
    return shown("error: " + text)


def shown(text: str) -> str:
    """``text`` for a Markdown box, verbatim: handles such as <asset0> would otherwise be taken for
    HTML tags and vanish."""
    return html.escape(text, quote=False)


def _photo_array(path: str) -> np.ndarray:
    from lowmcgm.data import load_image

    return np.asarray(load_image(path))


# ------------------------------------------------------------------------------------------------
# Tab 1: photo and subjects.

def brush(subject: int, size: int):
    """Subject ``subject``'s brush: its own colour (to tell canvases apart), ``size`` pixels wide."""
    gr = require_gradio()
    return gr.Brush(default_size=size, colors=["#%02x%02x%02x" % SUBJECT_COLOURS[subject]], color_mode="fixed")


def on_photo(path: str | None):
    """Show an uploaded photo on every subject's canvas, or say why it cannot be used.

    Returns the photo box's value (a refused file is taken out, so another can be uploaded), the
    message and the canvases.
    """
    if not path:  # cleared by the user (a refused file, taken out here, fires no clear): nothing to say
        return [None, "", *[None] * MAX_SUBJECTS]
    try:
        photo = _photo_array(path)
    except UserError as exc:
        return [None, error_text(exc, [path]), *[None] * MAX_SUBJECTS]
    h, w = photo.shape[:2]
    # The brush is sized to the photo (gradio's "auto" is a fixed 25 px); the editor can change it.
    size = max(2, round(min(h, w) / BRUSH_FRACTION))
    gr = require_gradio()
    editors = [gr.update(value=editor_value(photo, colour=SUBJECT_COLOURS[i]), brush=brush(i, size))
               for i in range(MAX_SUBJECTS)]
    return [gr.update(), shown(f"Photo {Path(path).name}: {w} x {h} px. Paint each subject on its canvas (or upload "
            "its mask)."), *editors]


def on_mask_upload(subject: int, photo: str | None, path: str | None) -> str:
    """The photo tab's message for subject ``subject``'s mask file, uploaded or taken out.

    An upload gets the CLI's checks against the photo at once (``uploaded_mask``), so a message
    about an earlier file never outlives it.
    """
    if not path:
        return shown(f"Subject {subject + 1}: no mask file, its painting is used.")
    try:
        mask = uploaded_mask(path, _photo_array(photo).shape[:2] if photo else None)
    except UserError as exc:
        return error_text(exc, [photo, path])
    h, w = mask.shape
    checked = "" if photo else "; upload the photo to check its size"
    return shown(f"Subject {subject + 1}: mask {Path(path).name} ({w} x {h} px) is used instead of its painting"
                 f"{checked}.")


def uploaded_mask(path: str, photo_hw: tuple[int, int] | None) -> np.ndarray:
    """An uploaded mask file as (H, W) bool, with the CLI's checks (``data.check_masks``) once the
    photo's (height, width) is known."""
    from lowmcgm.data import check_masks, load_mask

    mask = load_mask(path) > 0.5
    if photo_hw is not None:
        check_masks([mask], [path], photo_hw[::-1])
    return mask


def subject_masks(photo: str | None, count: int, editors: list[Any], uploads: list[str | None]) -> list[np.ndarray]:
    """Each subject's mask at the photo's size: an uploaded mask file wins over painting.

    Uploaded masks get the CLI's checks (``data.check_masks``), with the CLI's messages.
    """
    if not photo:
        raise UserError("No photo: upload one first.")
    h, w = _photo_array(photo).shape[:2]
    masks = []
    for i in range(count):
        if uploads[i]:
            mask = uploaded_mask(uploads[i], (h, w))
        else:
            mask = painted_mask(editors[i])
            if mask is None:
                raise UserError(f"Subject {i + 1} has no mask: paint it over the photo, or upload a mask file.")
            mask = fit_mask(mask, h, w)
        masks.append(mask)
    return masks


def on_show_masks(photo, count, *rest):
    """The masks over the photo, and the message: how many are ready, with a warning per overlap.

    ``rest``: per subject slot the canvas, then per slot the mask upload, then per slot the handle.
    """
    editors, uploads, handles = rest[:MAX_SUBJECTS], rest[MAX_SUBJECTS:2 * MAX_SUBJECTS], rest[2 * MAX_SUBJECTS:]
    try:
        masks = subject_masks(photo, int(count), list(editors), list(uploads))
    except UserError as exc:
        return error_text(exc, [photo, *uploads]), None
    subjects = tuple(Subject(handle_of(handles, i), "", mask) for i, mask in enumerate(masks))
    message = " ".join([f"{len(masks)} subject mask(s) ready.", *overlap_warnings(subjects)])
    return shown(message), overlay(_photo_array(photo), masks)


def handle_of(handles, i: int) -> str:
    """Subject ``i``'s handle as typed, or its default when the box is empty."""
    return handles[i] or f"<asset{i}>"


# ------------------------------------------------------------------------------------------------
# Tab 2: train.

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


# ------------------------------------------------------------------------------------------------
# Tab 3: pose and sample.

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
    from lowmcgm.sampling.prompts import PromptSpec, handles_in_text, normalize_handle
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
            elif mask is not None:
                pose_dir = pose_dir or new_folder(folder / "ui-poses", stamp)
                pose_files[normalize_handle(handle)] = save_mask(mask, pose_dir / f"{handle.strip('<>')}.png")
                used.append((pose_files[normalize_handle(handle)], f"pose of {handle}"))
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


# ------------------------------------------------------------------------------------------------
# Layout.

def build_app(root: Path, base_models: tuple[str, ...] = ("toy",), preset: str = "toy-cpu"):
    """The page's ``gr.Blocks``; ``launch`` serves it. ``base_models``: those it offers, the first chosen."""
    gr = require_gradio()
    from lowmcgm.presets import list_presets

    state = PageState(Path(root), tuple(base_models))
    bound = lambda fn: (lambda *args: fn(state, *args))  # noqa: E731  (callbacks see the page's state)

    with gr.Blocks(title="lowmcgm", delete_cache=(3600, CACHE_MAX_AGE_S)) as page:
        gr.Markdown("# lowmcgm\nTeach a model several subjects from one photo, then draw them in new poses.")
        with gr.Tab("1 · Photo and subjects", id="tab-photo"):
            photo = gr.File(label="Photo (PNG or JPEG)", type="filepath", elem_id="photo")
            count = gr.Slider(1, MAX_SUBJECTS, value=2, step=1, label="Subjects", elem_id="count")
            photo_msg = gr.Markdown(elem_id="photo-message")
            editors, uploads, handles, words, groups = [], [], [], [], []
            with gr.Row(elem_classes=CANVAS_ROW_CLASS):
                for i in range(MAX_SUBJECTS):
                    with gr.Column(visible=i < 2, min_width=CANVAS_COLUMN_PX, scale=0) as group:
                        gr.Markdown(f"**Subject {i + 1}**")
                        handles.append(gr.Textbox(value=f"<asset{i}>", label="Handle", elem_id=f"handle{i}"))
                        words.append(gr.Textbox(label="Initializer word (optional, e.g. dog)",
                                                elem_id=f"word{i}"))
                        editors.append(gr.ImageEditor(type="numpy", label="Paint the subject", elem_id=f"editor{i}",
                                                      brush=brush(i, 12), layers=False, transforms=(),
                                                      sources=(), elem_classes=CANVAS_CLASS, height=CANVAS_HEIGHT_PX))
                        uploads.append(gr.File(label="...or upload its mask", type="filepath",
                                               elem_id=f"mask-upload{i}"))
                    groups.append(group)
            show = gr.Button("Show masks over the photo", elem_id="show-masks")
            preview = gr.Image(label="Masks over the photo", interactive=False, elem_id="mask-overlay")

        with gr.Tab("2 · Train", id="tab-train"):
            with gr.Row():
                run_name = gr.Textbox(value=default_run_name(), label="Run name (a folder under the page's root)",
                                      elem_id="run-name")
                preset_box = gr.Dropdown(sorted(list_presets()), value=preset, label="Preset", elem_id="preset")
                base_box = gr.Dropdown(list(state.base_models), value=state.base_models[0], label="Base model",
                                       elem_id="base-model")
                preview_every = gr.Number(value=preset_preview_every(preset), precision=0,
                                          label="Preview every N steps (0: only before training)",
                                          elem_id="preview-every")
            with gr.Row():
                first, second = preset_steps(preset)
                phase1_box = gr.Number(value=first, precision=0, elem_id="phase1-steps",
                                       label="Phase 1 steps (the handles alone; the preset's, or fewer for a quick try)")
                phase2_box = gr.Number(value=second, precision=0, elem_id="phase2-steps",
                                       label="Phase 2 steps (handles and LoRA together)")
            with gr.Row():
                estimate_btn = gr.Button("Estimate GPU memory", elem_id="estimate")
                start_btn = gr.Button("Start training", variant="primary", elem_id="start")
                stop_btn = gr.Button("Stop", elem_id="stop")
                resume_btn = gr.Button("Resume this run", elem_id="resume")
            train_msg = gr.Markdown(elem_id="train-message")
            estimate_md = gr.Markdown(elem_id="estimate-result")
            train_status = gr.Markdown(elem_id="train-status")
            # No labels on the pictures: gradio lays a label over the picture's top left corner,
            # where the attention picture's own title (step, prompt) is.
            gr.Markdown("Newest preview, and its cross-attention maps (where each handle and mask token looks):")
            with gr.Row():
                preview_img = gr.Image(show_label=False, interactive=False, elem_id="preview", scale=1)
                attention_img = gr.Image(show_label=False, interactive=False, elem_id="attention", scale=3)
            curve = gr.Image(label="Loss curve", interactive=False, elem_id="loss-curve")
            timer = gr.Timer(POLL_S)

        with gr.Tab("3 · Pose and sample", id="tab-sample"):
            with gr.Row():
                runs = gr.Dropdown(list_runs(state.root), value=None, label="Run", elem_id="runs",
                                   allow_custom_value=False)
                refresh = gr.Button("Refresh runs", elem_id="refresh-runs")
                artifact_upload = gr.File(label="...or upload an artifact (.safetensors)", type="filepath",
                                          elem_id="artifact-upload")
            sample_msg = gr.Markdown(elem_id="sample-message")
            prompt = gr.Textbox(label="Prompt (name the handles)", elem_id="prompt")
            gr.Markdown("Each handle's pose: draw it on its canvas, pick one from the library, or upload a mask. "
                        "A blank canvas means no pose for that handle.")
            pose_editors, pose_pickers, pose_uploads, pose_cols = [], [], [], []
            with gr.Row(elem_classes=CANVAS_ROW_CLASS):
                for i in range(MAX_SUBJECTS):
                    with gr.Column(visible=i < 2, min_width=CANVAS_COLUMN_PX, scale=0) as col:
                        pose_pickers.append(gr.Dropdown([""] + pose_names(), value="", label="From the pose library",
                                                        elem_id=f"pose-pick{i}"))
                        pose_editors.append(gr.ImageEditor(value=editor_value(blank_sheet()), type="numpy",
                                                           label="Draw the pose",
                                                           elem_id=f"pose{i}", brush=brush(i, 10), layers=False,
                                                           transforms=(), sources=(), elem_classes=CANVAS_CLASS,
                                                           height=CANVAS_HEIGHT_PX))
                        pose_uploads.append(gr.File(label="...or upload a pose mask", type="filepath",
                                                    elem_id=f"pose-upload{i}"))
                    pose_cols.append(col)
            with gr.Row():
                num_images = gr.Number(value=2, precision=0, label="Images", elem_id="num-images")
                seed = gr.Number(value=0, precision=0, label="First seed", elem_id="seed")
                steps = gr.Number(value=20, precision=0, label="Steps", elem_id="steps")
                cfg_scale = gr.Number(value=7.5, label="Prompt guidance scale (CFG)", elem_id="guidance-scale",
                                      info="How closely the images follow the prompt.")
                guidance_field = config_field("sample.pose_guidance")[0]
                pose_guidance = gr.Radio(list(guidance_field.metadata["choices"]), value=guidance_field.default,
                                         label="Pose guidance", elem_id="pose-guidance",
                                         info=guidance_field.metadata["help"].removeprefix("pose guidance: "))
                sample_base = gr.Dropdown([("the one the run used", ""), *[(m, m) for m in state.base_models]],
                                          value="", label="Base model", elem_id="sample-base")
            sample_btn = gr.Button("Sample", variant="primary", elem_id="sample")
            history = gr.State([])  # this browser tab's images, newest first
            waiting_for = gr.State(None)  # a run picked while it trains, opened when its artifact is written
            trained = gr.State(None)  # set by the timer to that run once it can be opened
            drawn = gr.State(None)  # the job as this tab last drew it (``poll_key``)
            with gr.Row():
                gallery = gr.Gallery(label="Images since the page was opened (newest first)", elem_id="gallery",
                                     columns=4)
                pose_gallery = gr.Gallery(label="Poses used", elem_id="pose-gallery", columns=4)
            with gr.Row():
                fmt = gr.Radio(list(FORMATS), value=FORMATS[0], label="Export for other tools", elem_id="format",
                               info=MASK_ENCODER_NOTE)
                export_btn = gr.Button("Export", elem_id="export")
                download_artifact = gr.Button("Artifact file", elem_id="artifact-file")
            download = gr.File(label="Download", interactive=False, elem_id="download")

        # Wiring.
        photo.upload(on_photo, photo, [photo, photo_msg, *editors])
        photo.clear(on_photo, photo, [photo, photo_msg, *editors])
        count.change(lambda n: [gr.update(visible=i < int(n)) for i in range(MAX_SUBJECTS)], count, groups)
        for i, mask_upload in enumerate(uploads):  # each rewrites the tab's message, as a photo upload does
            for event in (mask_upload.upload, mask_upload.clear):
                event(lambda p, m, i=i: on_mask_upload(i, p, m), [photo, mask_upload], photo_msg)
        show.click(on_show_masks, [photo, count, *editors, *uploads, *handles], [photo_msg, preview])
        preset_box.change(lambda name: [preset_preview_every(name), *preset_steps(name)], preset_box,
                          [preview_every, phase1_box, phase2_box])
        for choice in (preset_box, base_box):  # an estimate of another choice would be read as this one's
            choice.change(lambda: "", None, estimate_md)

        def estimating(preset_name, base_model):  # a generator: the first line shows while it traces
            yield ("Estimating: tracing one training step of each phase on fake tensors (no GPU used; about a "
                   "minute on a CPU for a real model)...")
            yield on_estimate(state, preset_name, base_model)

        estimate_btn.click(estimating, [preset_box, base_box], estimate_md)
        start_btn.click(bound(start_training),
                        [photo, count, run_name, preset_box, base_box, preview_every, phase1_box, phase2_box,
                         *editors, *uploads, *handles, *words], train_msg)
        stop_btn.click(lambda: shown(state.jobs.stop()), None, train_msg)
        resume_btn.click(bound(resume_training), run_name, train_msg)

        refresh.click(lambda current: refreshed_runs(state, current), runs, runs)

        def opened(name, text):
            return open_run_outputs(state, name, text)

        opened_outputs = [sample_msg, prompt, *pose_cols, *pose_editors, waiting_for]
        runs.change(opened, [runs, prompt], opened_outputs)

        # One timer, one request a tick, for both tabs: the training job's status, and whether a run
        # the Sample tab waits for has its artifact. Only a State is touched for the latter: a tick
        # that had the prompt or the canvases among its outputs would hold them while it runs.
        def ticked(waiting, last):
            key = poll_key(state)  # redrawn only when the job changed: the curve is re-rendered then
            shown_now = [gr.update()] * 4 if key == last else poll_training(state)
            return [*shown_now, waiting if reopen_when_trained(state, waiting) else None, key]

        timer.tick(ticked, [waiting_for, drawn], [train_status, preview_img, attention_img, curve, trained, drawn],
                   show_progress="hidden")
        trained.change(lambda name, text: opened(name, text) if name else [gr.update()] * len(opened_outputs),
                       [trained, prompt], opened_outputs)
        artifact_upload.upload(lambda p: _then_refresh(on_upload_artifact(state, p), state), artifact_upload,
                               [sample_msg, runs])
        for picker, editor in zip(pose_pickers, pose_editors):
            picker.change(on_pose_library, picker, editor)
        def sampled(history, *args):
            message, images, used = sample(state, *args)
            if images is None:  # refused: what the galleries show stays
                return message, gr.update(), gr.update(), history
            history = images + history  # newest first, every image since the page was opened
            return message, history, used, history

        sample_btn.click(sampled, [history, runs, prompt, sample_base, num_images, seed, steps, cfg_scale,
                                   pose_guidance, *pose_editors, *pose_uploads, *pose_pickers],
                         [sample_msg, gallery, pose_gallery, history])
        export_btn.click(bound(export), [runs, fmt], [sample_msg, download])
        download_artifact.click(lambda name: _artifact_download(state, name), runs, [sample_msg, download])
    page.lowmcgm_state = state  # tests and the launcher reach the job through it
    return page


def refreshed_runs(state: PageState, current: str | None) -> dict:
    """The run list read again, as an update of the run picker.

    ``current`` is the pick when the click was queued. Only a pick whose folder vanished is
    cleared: writing ``current`` back would undo a run picked while the refresh waited its turn.
    """
    gr = require_gradio()
    names = list_runs(state.root)
    if not current or current in names:
        return gr.update(choices=names)
    return gr.update(choices=names, value=None)


def _then_refresh(result: tuple[str, str | None], state: PageState):
    """The upload's message, and the run list with the uploaded artifact's run picked."""
    gr = require_gradio()
    message, name = result
    names = list_runs(state.root)
    return message, gr.update(choices=names, value=name if name in names else None)


def _artifact_download(state: PageState, name: str):
    try:
        return shown(f"Artifact of run '{name}'."), str(run_artifact(state, name))
    except UserError as exc:
        return error_text(exc), None


# Uploads larger than this are refused by the server (a photo or an artifact is far smaller).
MAX_UPLOAD = "200mb"


def launch(root: Path, host: str = "127.0.0.1", port: int = 7860, base_models: tuple[str, ...] = ("toy",),
           preset: str = "toy-cpu", block: bool = True):
    """Serve the page on ``host:port``: never a public share link; files served only from ``root``.

    gradio's own copies of uploads and served files go to ``<root>/.gradio-cache`` (a name no run
    can take), emptied when the page starts and of files older than ``CACHE_MAX_AGE_S`` every hour.

    Raises:
        UserError: a base model in ``base_models`` that names nothing loadable.
    """
    import os

    from lowmcgm.models.loading import locate_base_model

    if not base_models:
        raise UserError("No base model to offer: pass --base-model.")
    for name in base_models:  # checked once here; the page takes no other model path
        locate_base_model(name)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page makes no calls outside
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    cache = root / CACHE_FOLDER
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["GRADIO_TEMP_DIR"] = str(cache)  # read by gradio when the page's Blocks is made
    page = build_app(root, base_models=tuple(base_models), preset=preset)
    page.queue(default_concurrency_limit=1)
    # quiet: gradio's own lines suggest share=True, which this page never uses.
    page.launch(server_name=host, server_port=port, share=False, allowed_paths=[str(root)],
                max_file_size=MAX_UPLOAD, prevent_thread_lock=True, quiet=True, footer_links=[], css=PAGE_CSS)
    if block:
        print(f"The page is at http://{host}:{port} (runs under {root}); Ctrl-C or SIGTERM stops it.", flush=True)
        try:
            page.block_thread()
        finally:  # however the wait ended (a signal, a terminal gone): a running job stops, and is waited for
            closing = page.lowmcgm_state.jobs.close()
            with contextlib.suppress(OSError):  # stdout may be what went away
                if closing:
                    print(escape_controls(closing), flush=True)
    return page


# gradio's cache under the root: a dot name, which run names (workspace.RUN_NAME) cannot start with.
CACHE_FOLDER = ".gradio-cache"
# An upload stays usable this long (a photo uploaded in the morning still trains in the afternoon).
CACHE_MAX_AGE_S = 12 * 3600
