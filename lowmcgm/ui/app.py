"""The gradio page: three tabs (photo and subjects, train, pose and sample) over the library; this
module lays them out and wires them to their callbacks (``subjects_tab``, ``train_tab``,
``sample_tab``), and ``launch`` serves the page.

Callbacks only translate between widgets and library calls; every ``UserError`` becomes the
message line of its tab (the CLI's one line, without a traceback). State that outlives a click
(the training job, the loaded base model) lives in ``PageState``, one per page process: the page
is for one person on one GPU.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from lowmcgm.config import config_field
from lowmcgm.console.terminal import escape_controls
from lowmcgm.errors import UserError
from lowmcgm.interop.export import FORMATS, MASK_ENCODER_NOTE
from lowmcgm.ui import require_gradio
from lowmcgm.ui.editor import blank_sheet, editor_value
from lowmcgm.ui.page_state import MAX_SUBJECTS, PageState, error_text, shown
from lowmcgm.ui.poses import pose_names
from lowmcgm.ui.sample_tab import (export, on_pose_library, on_upload_artifact, open_run_outputs, reopen_when_trained,
                                   run_artifact, sample)
from lowmcgm.ui.subjects_tab import brush, on_mask_upload, on_photo, on_show_masks
from lowmcgm.ui.train_tab import (on_estimate, poll_key, poll_training, preset_preview_every, preset_steps,
                                  resume_training, start_training)
from lowmcgm.ui.workspace import default_run_name, list_runs

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
                preset_box = gr.Dropdown(list(list_presets()), value=preset, label="Preset", elem_id="preset")
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
