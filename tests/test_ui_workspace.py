"""The web page's pieces without a browser: canvases to masks, run folders, the training job."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_photo, make_tiny_artifact

from lowmcgm.console.progress import EventLog, read_events
from lowmcgm.data import load_mask
from lowmcgm.errors import UserError
from lowmcgm.toy.scenes import save_mask
from lowmcgm.ui.editor import blank_sheet, editor_value, overlay, painted_mask
from lowmcgm.ui.jobs import JobSlot, TrainingJob, last_error
from lowmcgm.ui.poses import pose_mask, pose_names
from lowmcgm.ui.workspace import (ARTIFACT_NAME, Subject, TrainRequest, list_runs, prepare_run, resume_command,
                                  run_folder)


def test_painted_mask_is_any_opaque_pixel_of_any_layer():
    assert painted_mask(None) is None
    assert painted_mask(editor_value(blank_sheet(32))) is None  # an empty layer paints nothing
    a, b = np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 4), np.uint8)
    a[2:5, 3:9, 3] = 255
    b[20, 20] = (0, 0, 0, 1)  # a black, barely opaque pixel still counts
    mask = painted_mask({"background": blank_sheet(32), "layers": [a, b], "composite": None})
    assert mask.sum() == 3 * 6 + 1 and mask[20, 20] and mask[2, 3] and not mask[0, 0]


def test_editor_value_round_trips_a_mask_at_the_canvas_size():
    mask = np.zeros((16, 16), bool)
    mask[4:12, 2:6] = True
    value = editor_value(blank_sheet(64), mask)
    back = painted_mask(value)
    assert back.shape == (64, 64) and back[16:48, 8:24].all() and back.sum() == 32 * 16


def test_overlay_tints_only_the_masked_pixels():
    photo = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[0, 0] = True
    out = overlay(photo, [mask, None])
    assert (out[0, 0] != 100).any() and (out[1:, :] == 100).all()


def test_pose_library_has_every_kind_and_pose_with_distinct_shapes():
    names = pose_names()
    assert "dog sitting" in names and "person lying" in names and len(names) == len(set(names))
    lying, standing = pose_mask("person lying"), pose_mask("person standing")
    assert lying.any() and standing.any()

    def aspect(m):  # height over width of the silhouette's box
        ys, xs = np.nonzero(m)
        return (np.ptp(ys) + 1) / (np.ptp(xs) + 1)

    assert aspect(lying) < 1 < aspect(standing)
    with pytest.raises(KeyError):
        pose_mask("dragon flying")


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", "", ".", "..", " x y", "-dash", "x" * 65])
def test_run_names_are_plain_folders_under_the_root(tmp_path, name):
    with pytest.raises(UserError, match="plain folder name"):
        run_folder(tmp_path, name)


def test_run_folder_is_directly_under_the_root(tmp_path):
    assert run_folder(tmp_path, "run-1.a_b") == (tmp_path / "run-1.a_b").resolve()


def _request(tmp_path: Path, name: str = "r1", words=("dog", "cat"), preset: str = "tiny-cpu",
             preview_every: int = 10, handles=("<asset0>", "<asset1>")) -> TrainRequest:
    photo, a, b = make_photo(tmp_path)
    masks = [load_mask(p) > 0.5 for p in (a, b)]
    subjects = tuple(Subject(h, w, m) for h, w, m in zip(handles, words, masks))
    return TrainRequest(name, photo, subjects, preset, "tiny", preview_every=preview_every)


def test_prepare_run_writes_inputs_and_the_clis_command(tmp_path):
    root = tmp_path / "root"
    argv = prepare_run(root, _request(tmp_path))
    folder = root / "r1"
    assert json.loads((folder / "ui-run.json").read_text()) == argv
    assert argv[:3] == ["run", "--preset=tiny-cpu", "--base-model=tiny"]
    flags = [a.split("=", 1)[0] for a in argv[1:]]
    assert all(a.startswith("--") and "=" in a for a in argv[1:])  # no value stands alone, to be read as a flag
    assert flags.count("--mask") == 2 and flags.count("--init-word") == 2 and "--events" in flags
    assert (load_mask(folder / "inputs" / "mask1.png") > 0.5).sum() > 0
    with pytest.raises(UserError, match="exists already"):
        prepare_run(root, _request(tmp_path))


@pytest.mark.parametrize("change, message", [
    (dict(words=("dog", "")), "every subject, or for none"),
    (dict(preset="no-such-preset"), "no-such-preset"),
    (dict(name="../x"), "plain folder name"),
    (dict(preview_every=-5), "preview_every must be >= 0"),  # issue 23 D: refused by the child, folder kept
    (dict(handles=("<a>", "<a>")), "<a>"),
])
def test_a_refused_run_leaves_nothing_behind(tmp_path, change, message):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UserError, match=message):
        prepare_run(root, _request(tmp_path, **change))
    assert list(root.iterdir()) == []


def test_user_words_reach_the_child_as_values_never_as_flags(tmp_path):
    # Issue 23 D: an initializer word "--out=<folder>" was read by the child's parser as a flag.
    from lowmcgm.cli import build_parser

    root = tmp_path / "root"
    argv = prepare_run(root, _request(tmp_path, words=(f"--out={tmp_path / 'elsewhere'}", "-h")))
    args = build_parser().parse_args(argv)
    assert list(args.init_word) == [f"--out={tmp_path / 'elsewhere'}", "-h"]
    assert Path(args.out) == (root / "r1").resolve()


def test_the_steps_asked_for_reach_the_child_and_the_start_check(tmp_path):
    # Issue 24: the page offered no way to shorten training for a quick try.
    from lowmcgm.cli import build_parser
    from lowmcgm.ui.workspace import input_paths, run_command

    root = tmp_path / "root"
    request = dataclasses.replace(_request(tmp_path), phase1_steps=7, phase2_steps=9)
    argv = prepare_run(root, request)
    assert build_parser().parse_args(argv).set == ["train.phase1_steps=7", "train.phase2_steps=9"]
    cfg = run_command(request, root / "r1", *input_paths(root / "r1", request)).config()
    assert (cfg.train.phase1_steps, cfg.train.phase2_steps) == (7, 9)
    with pytest.raises(UserError, match="phase1_steps"):  # the CLI's own bounds, before any folder is made
        prepare_run(root, dataclasses.replace(request, run_name="r2", phase1_steps=-1))
    assert not (root / "r2").exists()


def test_a_run_named_like_a_file_in_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "notes.txt").write_text("mine\n")
    with pytest.raises(UserError, match="exists already .as a file"):
        prepare_run(root, _request(tmp_path, name="notes.txt"))
    assert (root / "notes.txt").read_text() == "mine\n"


def _page_start(state, tmp_path, name="r1", base="tiny", preview_every=0, steps=(None, None)):
    """Start through the page's own function, the two subjects uploaded as mask files (steps: the
    step boxes, None as a blank one)."""
    from lowmcgm.ui import page_state, train_tab

    photo, a, b = make_photo(tmp_path)
    rest = [None] * page_state.MAX_SUBJECTS + [a, b, None, None] + ["<asset0>", "<asset1>", "", ""] + [""] * 4
    return train_tab.start_training(state, photo, 2, name, "tiny-cpu", base, preview_every, *steps, *rest)


def test_the_page_offers_only_its_own_base_models(tmp_path):
    # Issue 23 D and F: a base model box took any server path (and Estimate said whether it existed).
    from lowmcgm.ui import page_state, train_tab

    state = page_state.PageState(tmp_path / "root", ("tiny",))
    for probe in ("/nonexistent/model", str(tmp_path)):
        said = _page_start(state, tmp_path, base=probe)
        assert "not one this page offers (tiny)" in said and "--base-model" in said
        assert train_tab.on_estimate(state, "tiny-cpu", probe) == said
        assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir())
    from lowmcgm.artifact import load_artifact

    artifact = load_artifact(_untrained_run(tmp_path / "root", "a", 0))
    with pytest.raises(UserError, match="not one this page offers"):
        state.base_model_of(artifact, str(tmp_path))
    assert state.base_model_of(artifact, "") == "tiny"
    with pytest.raises(UserError, match="trained on base model 'tiny', which this page does not offer"):
        page_state.PageState(tmp_path / "root", ("toy",)).base_model_of(artifact, "")


def test_start_during_a_resume_leaves_no_folder_without_its_job(tmp_path, monkeypatch):
    # Issue 23 D: Start right after Resume of another run was refused but left its new folder.
    import threading

    from lowmcgm.ui import jobs, page_state, train_tab

    def stand_in(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])

    monkeypatch.setattr(jobs.TrainingJob, "start", stand_in)
    state = page_state.PageState(tmp_path / "root", ("tiny",))
    other = threading.Thread(target=lambda: _try_start(state.jobs, tmp_path / "root" / "resumed"))
    real = train_tab.prepare_run

    def slow_prepare(root, request):  # a Resume clicked while the new run is being prepared
        other.start()
        time.sleep(0.5)
        return real(root, request)

    monkeypatch.setattr(train_tab, "prepare_run", slow_prepare)
    try:
        said = _page_start(state, tmp_path)
        other.join(10)
        assert said == "Started run 'r1'." and state.jobs.job.folder.name == "r1"
        assert not (tmp_path / "root" / "resumed").exists()
    finally:
        state.jobs.job.process.kill()
        state.jobs.job.process.wait()


def _try_start(slot, folder):
    try:
        slot.start(["run"], folder)
    except UserError:
        pass


def test_no_initializer_words_pass_none(tmp_path):
    argv = prepare_run(tmp_path / "root", _request(tmp_path, words=("", "")))
    assert not any(a.startswith("--init-word") for a in argv)


def test_resume_needs_a_page_run_with_a_checkpoint(tmp_path):
    root = tmp_path / "root"
    prepare_run(root, _request(tmp_path))
    assert list_runs(root) == ["r1"]  # listed from its start: it can be picked on the Sample tab while it trains
    with pytest.raises(UserError, match="no checkpoint"):
        resume_command(root, "r1")
    (root / "r1" / "checkpoints").mkdir()
    (root / "r1" / "checkpoints" / "last.safetensors").write_bytes(b"x")
    assert resume_command(root, "r1")[-1] == "--resume"
    assert list_runs(root) == ["r1"]
    (root / "other").mkdir()
    with pytest.raises(UserError, match="not started from the page"):
        resume_command(root, "other")


def test_event_log_round_trips_and_skips_a_half_written_line(tmp_path):
    log = EventLog(tmp_path / "e" / "events.jsonl")
    log({"kind": "saved", "path": tmp_path, "eta_s": float("inf")})
    log.close()
    with open(tmp_path / "e" / "events.jsonl", "a") as f:
        f.write('{"kind": "st')
    events = read_events(tmp_path / "e" / "events.jsonl")
    assert events == [{"kind": "saved", "path": str(tmp_path), "eta_s": float("inf")}]
    assert read_events(tmp_path / "missing.jsonl") == []


def test_job_reports_the_clis_error_line(tmp_path):
    # A real child process of the real CLI, refused at once: the page shows the CLI's error line.
    job = TrainingJob(["run", "--preset", "no-such-preset", "--image", "x.png", "--mask", "m.png",
                       "--out", str(tmp_path / "out")], tmp_path / "out")
    job.start()
    assert job.wait(120) == 2
    status = job.status()
    assert status.state == "failed" and "no-such-preset" in status.text
    assert status.text == last_error(tmp_path / "out" / "ui-train.log")


def _stand_in(job: TrainingJob, code: str) -> None:
    """A child running ``code`` in place of training (the job's rules are what is tested)."""
    job.folder.mkdir(parents=True, exist_ok=True)
    job.process = subprocess.Popen([sys.executable, "-c", code])


def test_a_child_that_will_not_stop_is_killed_and_the_page_says_no_checkpoint(tmp_path):
    job = TrainingJob([], tmp_path / "a")
    _stand_in(job, "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('', flush=True); "
                   "time.sleep(60)")
    time.sleep(1.0)  # its handler in place
    job.stop(timeout_s=1)
    job.wait(30)
    assert job.status().state == "stopped" and job.status().text.startswith("Killed before its first step")
    assert "no checkpoint" in job.status().text and "start the run again" in job.status().text


def test_a_run_stopped_while_it_samples_says_its_artifact_is_written(tmp_path):
    # Found by hand: lowmcgm run samples after training; the page said "Phase 2: step 20/20" all the
    # while, and a stop then was "Stopped at phase 2, step 20, without writing a checkpoint".
    job = TrainingJob([], tmp_path / "a")
    _stand_in(job, "import time; time.sleep(60)")
    step = {"kind": "step", "phase": 2, "step": 20, "total": 20, "losses": {"total": 0.1}, "it_per_s": 3.0}
    lines = [step, {"kind": "saved", "what": "artifact", "path": str(tmp_path / "a" / ARTIFACT_NAME)},
             {"kind": "saved", "what": "image 1/2", "path": str(tmp_path / "a" / "samples" / "p00.png")}]
    (tmp_path / "a" / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    status = job.status()
    assert status.state == "running" and status.text.startswith("Trained: the artifact is written")
    assert "(image 1/2 written)" in status.text
    job.stop(timeout_s=30)
    job.wait(30)
    status = job.status()
    assert status.state == "stopped" and status.text.startswith("Stopped after training")
    assert "checkpoint" not in status.text


def _step(phase: int, step: int, total: int, loss: float, rate: float = 2.0) -> dict:
    return {"kind": "step", "phase": phase, "step": step, "total": total, "losses": {"total": loss}, "it_per_s": rate}


def test_the_loss_curve_after_resume_is_the_whole_runs(tmp_path):
    # Issue 24: after Resume the curve showed only the resumed part. Attempt one reached phase 1
    # step 3 (checkpoint at 2); attempt two trains step 3 again, then phase 2.
    job = TrainingJob([], tmp_path / "a")
    first = [{"kind": "phase", "phase": 1, "total": 4, "start": 0}, _step(1, 1, 4, 0.9), _step(1, 2, 4, 0.8),
             _step(1, 3, 4, 0.7)]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in first))
    job.argv = ["--version"]  # a real start (of a command that ends at once): earlier events are kept aside
    job.start()
    job.wait(60)
    assert not (tmp_path / "a" / "events.jsonl").exists()
    second = [{"kind": "phase", "phase": 1, "total": 4, "start": 2}, _step(1, 3, 4, 0.5), _step(1, 4, 4, 0.4),
              {"kind": "phase", "phase": 2, "total": 2, "start": 0}, _step(2, 1, 2, 0.3)]
    (tmp_path / "a" / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in second))
    history = job.status().history
    assert [(r["phase"], r["step"], r["total"]) for r in history] == [(1, 1, 0.9), (1, 2, 0.8), (1, 3, 0.5),
                                                                       (1, 4, 0.4), (2, 1, 0.3)]


def test_the_status_says_how_long_the_model_has_loaded_and_what_the_whole_run_has_left(tmp_path):
    # Issue 24: a silent "loading" while a real model loads, and an ETA for the current phase only.
    job = TrainingJob([], tmp_path / "a")
    _stand_in(job, "import time; time.sleep(60)")
    job.started_at = time.monotonic() - 42
    try:
        assert job.status().text.startswith("Starting (42 s): loading the base model")
        (tmp_path / "a" / "config.toml").write_text("[train]\nphase1_steps = 100\nphase2_steps = 300\n")
        (tmp_path / "a" / "events.jsonl").write_text(json.dumps(_step(1, 40, 100, 0.5, rate=2.0)) + "\n")
        assert "about 3.0 min of training left" in job.status().text  # (60 + 300) steps at 2 it/s
        (tmp_path / "a" / "events.jsonl").write_text(json.dumps(_step(2, 280, 300, 0.5, rate=2.0)) + "\n")
        assert "about 10 s of training left" in job.status().text
    finally:
        job.process.kill()
        job.process.wait()


def test_closing_the_page_stops_its_job_and_waits_for_it(tmp_path):
    # SIGTERM to the page closed it and left the child training, unseen (issue 23).
    slot = JobSlot()
    assert slot.close() == ""
    job = slot.job = TrainingJob([], tmp_path / "a")
    _stand_in(job, "import time; time.sleep(60)")
    said = slot.close(timeout_s=30)
    assert not job.running() and job.process.returncode == -15 and "without writing a checkpoint" in said


# A stand-in for a training child that counts the SIGTERMs it gets in a file: the first one "writes a
# checkpoint" for 2 s, then it exits 143; a second one means "stop now", as the trainer has it (exit 5).
COUNTING_CHILD = """
import signal, sys, time
count = 0
def on_term(signum, frame):
    global count
    count += 1
    open(sys.argv[1], "w").write(str(count))
    if count > 1:
        sys.exit(5)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while count == 0:
    time.sleep(0.05)
end = time.monotonic() + 2
while time.monotonic() < end:
    time.sleep(0.05)
sys.exit(143)
"""


def _counting_child(job: TrainingJob, counts: Path) -> None:
    job.folder.mkdir(parents=True, exist_ok=True)
    job.process = subprocess.Popen([sys.executable, "-c", COUNTING_CHILD, str(counts)], stdout=subprocess.PIPE)
    assert job.process.stdout.readline().strip() == b"ready"  # its handler in place


def test_stop_then_closing_the_page_signals_the_child_once(tmp_path):
    # A second SIGTERM makes the trainer stop mid-step without its checkpoint: Stop, then closing the
    # page, must send only one.
    slot = JobSlot()
    job = slot.job = TrainingJob([], tmp_path / "a")
    _counting_child(job, tmp_path / "count")
    assert "Stopping run 'a'" in slot.stop()
    slot.close(timeout_s=30)
    assert job.process.returncode == 143 and (tmp_path / "count").read_text() == "1"


def test_a_second_signal_while_the_page_closes_goes_to_the_child_and_the_page_still_waits(tmp_path):
    # The page left the child writing its checkpoint unseen when a second stop signal cut its wait.
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers belong to the main thread, and this test runs elsewhere")
    slot = JobSlot()
    job = slot.job = TrainingJob([], tmp_path / "a")
    _counting_child(job, tmp_path / "count")
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()  # to this process, as a supervisor would
    slot.close(timeout_s=30)
    assert not job.running() and job.process.returncode == 5  # the second signal reached the child
    assert (tmp_path / "count").read_text() == "2"


def test_the_page_stops_its_job_however_its_wait_ends(tmp_path, monkeypatch):
    # gradio's wait ended by an error of its own (its "closing server" line to a stdout that is gone):
    # the page still stopped its training child and waited for it.
    pytest.importorskip("gradio")
    import gradio as gr
    from ui_browser import free_port

    from lowmcgm.ui import app

    jobs = []

    def block_thread(page):
        job = page.lowmcgm_state.jobs.job = TrainingJob([], tmp_path / "a")
        _counting_child(job, tmp_path / "count")
        jobs.append(job)
        page.close()
        raise BrokenPipeError("stdout is gone")

    monkeypatch.setattr(gr.Blocks, "block_thread", block_thread)
    monkeypatch.setenv("GRADIO_TEMP_DIR", "")  # launch sets it: restored after this test
    with pytest.raises(BrokenPipeError):
        app.launch(tmp_path / "root", port=free_port(), base_models=("tiny",), block=True)
    assert not jobs[0].running() and jobs[0].process.returncode == 143
    assert (tmp_path / "count").read_text() == "1"


def test_an_argparse_refusal_shows_its_message(tmp_path):
    # A real child of the real CLI, refused by its parser: the page shows that line, not "exit code 2".
    job = TrainingJob(["run", "--bogus", "x"], tmp_path / "out")
    job.start()
    assert job.wait(120) == 2
    assert last_error(tmp_path / "out" / "ui-train.log").startswith("unrecognized arguments: --bogus x")
    assert job.status().text == last_error(tmp_path / "out" / "ui-train.log")


def test_job_slot_refuses_a_second_job_while_one_runs(tmp_path):
    slot = JobSlot()
    # A child that just sleeps stands in for training: the slot's rule is what is tested.
    job = slot.job = TrainingJob([], tmp_path / "a")
    job.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(UserError, match="is running"):
            slot.start(["run"], tmp_path / "b")
    finally:
        job.process.kill()
        job.process.wait()


def test_stop_writes_a_checkpoint_and_resume_finishes_the_run(tmp_path):
    # The page started in the background (nohup ... &) hands its child SIGINT ignored (issue 24):
    # Stop must stop it all the same, with a checkpoint, and say so.
    import signal

    root = tmp_path / "root"
    argv = prepare_run(root, _request(tmp_path, preview_every=0))
    # Longer than tiny-cpu's 20 steps, so the stop lands mid-phase; the same settings on resume.
    longer = ["--set", "train.phase1_steps=200", "--set", "train.phase2_steps=4", "--set", "train.checkpoint_every=0"]
    (root / "r1" / "ui-run.json").write_text(json.dumps(argv + longer))
    slot = JobSlot()
    assert "nothing to stop" in slot.stop()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        job = slot.start(argv + longer, root / "r1")
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 300
    while not any(e.get("kind") == "step" for e in read_events(root / "r1" / "events.jsonl")):
        assert job.running() and time.monotonic() < deadline, job.status().text
        time.sleep(0.2)
    assert job.status().state == "running" and job.status().text.startswith("Phase 1: step")
    assert "writes a checkpoint" in slot.stop()
    assert job.wait(60) == 143  # SIGTERM's exit code: it stopped by itself, nobody killed it
    assert job.status().state == "stopped" and "its checkpoint is written" in job.status().text
    assert job.killed_after_s is None and "not training (stopped)" in slot.stop()
    assert (root / "r1" / "checkpoints" / "last.safetensors").is_file()
    assert not (root / "r1" / "lowmcgm.safetensors").exists()

    resumed = slot.start(resume_command(root, "r1"), root / "r1")
    assert resumed.wait(600) == 0, resumed.status().text
    assert resumed.status().state == "finished" and (root / "r1" / "lowmcgm.safetensors").is_file()
    first = [e for e in read_events(root / "r1" / "events.jsonl") if e.get("kind") == "step"][0]
    assert first["step"] > 1  # it went on from the checkpoint, not from step 1


def test_a_pose_canvas_reads_strokes_and_a_dark_sheet():
    from lowmcgm.ui.editor import pose_on_canvas, sheet_with

    assert pose_on_canvas(editor_value(blank_sheet(32))) is None
    lying = pose_mask("cat lying")
    from_library = pose_on_canvas(editor_value(sheet_with(lying, 128)))
    np.testing.assert_array_equal(from_library, lying)
    stroke = np.zeros((128, 128), bool)
    stroke[:4, :4] = True
    both = pose_on_canvas(editor_value(sheet_with(lying, 128), stroke))
    assert both.sum() == lying.sum() + 16 and both[:4, :4].all()


def test_a_pose_library_pick_counts_before_its_canvas_is_redrawn():
    from lowmcgm.ui.sample_tab import on_pose_library, with_library_pose
    from lowmcgm.ui.editor import pose_on_canvas

    redrawn = pose_on_canvas(on_pose_library("dog sitting"))
    # Sample clicked before the canvas showed the pick: the pick alone is the pose.
    np.testing.assert_array_equal(with_library_pose(pose_on_canvas(editor_value(blank_sheet())), "dog sitting"),
                                  redrawn)
    # Clicked after: the same pose, not a second copy of it.
    np.testing.assert_array_equal(with_library_pose(redrawn, "dog sitting"), redrawn)
    stroke = np.zeros((64, 64), bool)
    stroke[:2, :2] = True
    joined = with_library_pose(stroke, "dog sitting")  # strokes on a smaller canvas keep their place
    assert joined.shape == (64, 64) and joined[:2, :2].all() and joined.sum() > 4
    assert with_library_pose(stroke, "") is stroke and with_library_pose(None, None) is None


def test_preview_box_shows_each_presets_own_figure():
    from lowmcgm.config import load_toml
    from lowmcgm.presets import presets_dir
    from lowmcgm.ui.train_tab import preset_preview_every

    for name in ("tiny-cpu", "toy-cpu"):
        declared = load_toml(presets_dir() / f"{name}.toml")["output.preview_every"]
        assert preset_preview_every(name) == declared
    assert preset_preview_every("tiny-cpu") != preset_preview_every("toy-cpu")


def test_a_small_preview_is_shown_enlarged_with_its_pixels_as_they_are(tmp_path):
    # Issue 24: a 64 px preview was a thumbnail in a wide box.
    from PIL import Image

    from lowmcgm.ui.train_tab import PREVIEW_MIN_PX, shown_large

    small = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    shown = shown_large(tmp_path / "small.png")
    assert shown.shape == (64 * 6, 48 * 6, 3) and min(shown.shape[:2]) >= PREVIEW_MIN_PX
    np.testing.assert_array_equal(shown[::6, ::6], small)  # whole blocks of the same pixels
    big = np.zeros((300, 400, 3), np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    assert shown_large(tmp_path / "big.png").shape == big.shape
    (tmp_path / "cut.png").write_bytes(b"\x89PNG half written")
    assert shown_large(tmp_path / "cut.png") is None


def test_step_boxes_show_each_presets_own_counts():
    from lowmcgm.config import load_toml
    from lowmcgm.presets import presets_dir
    from lowmcgm.ui.train_tab import preset_steps

    for name in ("tiny-cpu", "toy-cpu"):
        declared = load_toml(presets_dir() / f"{name}.toml")
        assert preset_steps(name) == (declared["train.phase1_steps"], declared["train.phase2_steps"])
    assert preset_steps("tiny-cpu") != preset_steps("toy-cpu")
    assert preset_steps("no-such-preset") == (None, None)  # blank boxes: Start then names the preset


def test_the_page_loads_a_fresh_base_for_an_artifact_trained_on_an_fp8_unet(tmp_path):
    # Sampling an fp8-trained artifact stores the UNet in fp8 for good: the page's cached base must
    # not carry that to the next artifact.
    from conftest import make_sdxl_artifact
    from safetensors import safe_open

    from lowmcgm.artifact import atomic_save
    from lowmcgm.ui.page_state import PageState

    plain = make_sdxl_artifact(tmp_path / "plain.safetensors")
    with safe_open(plain, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    fp8 = tmp_path / "fp8.safetensors"
    atomic_save(tensors, meta | {"training_config": json.dumps({"model": {"fp8_base": True}})}, fp8)
    from lowmcgm.artifact import load_artifact

    page = PageState(tmp_path / "root", ("tiny-xl",))
    base_for = lambda path: page.base_for(path, load_artifact(path), "")  # noqa: E731
    first = base_for(plain)
    assert base_for(plain) is first  # loaded once
    assert base_for(fp8) is not first and base_for(plain) is not first


def test_the_page_trains_samples_and_exports_an_sdxl_run(tmp_path):
    # The page's own pieces, without a browser: the training job runs the CLI line it built, then
    # Sample (a library pose for <asset0>) and Export go through the page's functions.
    from lowmcgm.ui import page_state, sample_tab

    root = tmp_path / "root"
    request = dataclasses.replace(_request(tmp_path, preview_every=0), base_model="tiny-xl")
    argv = prepare_run(root, request) + ["--set", "train.phase1_steps=3", "--set", "train.phase2_steps=3",
                                         "--steps", "2", "--num-images", "1"]
    job = JobSlot().start(argv, root / "r1")
    assert job.wait(600) == 0, job.status().text
    state = page_state.PageState(root, ("tiny-xl",))
    picks = [pose_names()[0]] + [None] * (page_state.MAX_SUBJECTS - 1)
    message, images, used = sample_tab.sample(state, "r1", "a photo of <asset0>", "", 1, 3, 2, 7.5, "latent",
                                       *([None] * 2 * page_state.MAX_SUBJECTS), *picks)
    assert "1 image(s)" in message and len(images) == 1 and used[0][1] == "pose of <asset0>"
    message, file = sample_tab.export(state, "r1", "embeddings")
    assert file.endswith(".zip"), message


def _untrained_run(root: Path, name: str, seed: int) -> Path:
    return make_tiny_artifact(root / name / "lowmcgm.safetensors", seed)


def _sample(state, run: str, picks=(), seed: int = 0, prompt: str = "a photo of <asset0> and <asset1>"):
    from lowmcgm.ui import page_state, sample_tab

    picks = list(picks) + [None] * (page_state.MAX_SUBJECTS - len(picks))
    return sample_tab.sample(state, run, prompt, "", 1, seed, 2, 7.5, "none", *([None] * 2 * page_state.MAX_SUBJECTS), *picks)


def test_sampling_again_and_again_reuses_the_base_without_the_last_artifacts_state(tmp_path):
    # Issue 24: every Sample after the first failed ("from_artifact on a base that still carries a
    # state"). Three in a row, with other poses, another run and back, in the same second.
    from lowmcgm.ui import page_state

    root = tmp_path / "root"
    for name, seed in (("a", 0), ("b", 1)):
        _untrained_run(root, name, seed)
    state = page_state.PageState(root, ("tiny",))
    shown = []
    first = None
    for run, picks in (("a", ["dog sitting"]), ("a", ["cat lying", "dog sitting"]), ("b", []), ("a", [])):
        message, images, used = _sample(state, run, picks)
        first = first or next(iter(state.bases.values()))
        assert images and "1 image(s)" in message, message
        assert len(used) == len(picks) and Path(images[0][0]).is_file()
        assert f"{run} · seed 0 · 2 steps" in images[0][1] and all(p in images[0][1] for p in picks)
        shown.append(images[0][0])
    assert len(set(shown)) == 4  # each in a folder of its own, though their clock stamps agree
    assert len(state.bases) == 1 and next(iter(state.bases.values())) is first  # one load for all


def test_a_refused_sample_keeps_the_gallery_and_leaves_no_folder(tmp_path):
    from lowmcgm.ui import page_state

    root = tmp_path / "root"
    _untrained_run(root, "a", 0)
    message, images, _ = _sample(page_state.PageState(root, ("tiny",)), "a", prompt="a photo of <asset7>")
    assert images is None and "asset7" in message
    assert not (root / "a" / "ui-samples").exists() or not any((root / "a" / "ui-samples").iterdir())


def test_two_artifact_uploads_in_one_second_get_a_run_each(tmp_path):
    from lowmcgm.ui import page_state, sample_tab

    artifact = _untrained_run(tmp_path, "made", 0)
    state = page_state.PageState(tmp_path / "root", ("tiny",))
    names = [sample_tab.on_upload_artifact(state, str(artifact))[1] for _ in range(3)]
    assert None not in names and len(set(names)) == 3
    assert all((tmp_path / "root" / n / "lowmcgm.safetensors").is_file() for n in names)


def test_refreshing_the_run_list_keeps_a_pick_made_while_it_waited(tmp_path):
    # CI: "Refresh runs" then a pick at once; the refresh, answered last, wrote back the pick it was
    # queued with (none) and the picked run closed. It clears only a pick whose folder vanished.
    from lowmcgm.ui import app, page_state

    root = tmp_path / "root"
    _untrained_run(root, "a", 0)
    _untrained_run(root, "b", 1)
    state = page_state.PageState(root, ("tiny",))
    for current in (None, "", "a"):
        update = app.refreshed_runs(state, current)
        assert sorted(update["choices"]) == ["a", "b"] and "value" not in update, (current, update)
    assert app.refreshed_runs(state, "gone")["value"] is None
    message, runs = app._then_refresh(("uploaded", "b"), state)
    assert runs["value"] == "b"


def test_a_prompt_naming_no_handle_samples_with_a_warning(tmp_path):
    from lowmcgm.ui import page_state

    _untrained_run(tmp_path / "root", "a", 0)
    message, images, _ = _sample(page_state.PageState(tmp_path / "root", ("tiny",)), "a", prompt="a photo of a dog")
    assert images and message.startswith("warning: the prompt names no handle (&lt;asset0&gt;, &lt;asset1&gt;)")


def test_a_run_picked_while_it_trains_opens_when_its_artifact_is_written(tmp_path):
    # Issue 24: it said "no artifact yet" and never reloaded; picking a run replaced the typed prompt.
    from lowmcgm.ui import page_state, sample_tab

    root = tmp_path / "root"
    state = page_state.PageState(root, ("tiny",))
    job = state.jobs.job = TrainingJob([], root / "a")
    _stand_in(job, "import time; time.sleep(30)")
    try:
        opened = sample_tab.on_open_run(state, "a", "my prompt")
        assert "is training" in opened[0] and opened[1] == "my prompt" and opened[-1] == "a"
        assert not sample_tab.reopen_when_trained(state, "a")
        _untrained_run(root, "a", 0)
        assert sample_tab.reopen_when_trained(state, "a")
        opened = sample_tab.on_open_run(state, "a", "my prompt")
        assert "handles &lt;asset0&gt;, &lt;asset1&gt;" in opened[0] and opened[1] == "my prompt"
        assert opened[-1] is None and opened[2:4] == [True, True]
        assert sample_tab.on_open_run(state, "a", "")[1] == "a photo of <asset0> and <asset1>"
    finally:
        job.process.kill()
        job.process.wait()


def test_opening_a_run_writes_the_prompt_only_to_fill_it_in(tmp_path):
    # Found by hand: a Refresh queued behind the training ticks re-opened "no run" with the prompt as
    # it was when queued, and wrote that back over what had been typed since.
    gr = pytest.importorskip("gradio")
    from lowmcgm.ui import page_state, sample_tab

    root = tmp_path / "root"
    state = page_state.PageState(root, ("tiny",))
    untouched = gr.update()
    assert sample_tab.open_run_outputs(state, "", "")[1] == untouched  # no run: the prompt is left alone
    job = state.jobs.job = TrainingJob([], root / "a")
    _stand_in(job, "import time; time.sleep(30)")
    try:
        outputs = sample_tab.open_run_outputs(state, "a", "")
        assert "is training" in outputs[0] and outputs[1] == untouched and outputs[-1] == "a"
    finally:
        job.process.kill()
        job.process.wait()
    _untrained_run(root, "a", 0)
    outputs = sample_tab.open_run_outputs(state, "a", "")
    assert outputs[1] == "a photo of <asset0> and <asset1>"  # filled in with the run's handles
    assert sample_tab.open_run_outputs(state, "a", "my prompt")[1] == untouched
    assert outputs[2] == gr.update(visible=True) and outputs[-1] is None


def test_the_page_keeps_gradios_files_under_its_root_and_refuses_a_base_model_it_cannot_find(tmp_path, monkeypatch):
    # Issue 23 F: gradio kept every upload and served file in the system's temporary folder, never cleaned.
    pytest.importorskip("gradio")
    from ui_browser import free_port

    from lowmcgm.ui import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", "")  # launch sets it: restored after this test
    monkeypatch.delenv("GRADIO_TEMP_DIR")
    root = tmp_path / "root"
    (root / ".gradio-cache").mkdir(parents=True)
    (root / ".gradio-cache" / "old-upload.png").write_bytes(b"x")
    with pytest.raises(UserError, match="Base model file not found|neither a diffusers folder"):
        app.launch(root, port=free_port(), base_models=("tiny", str(tmp_path / "nonexistent" / "model")), block=False)
    page = app.launch(root, port=free_port(), base_models=("tiny",), block=False)
    try:
        assert Path(page.GRADIO_CACHE) == (root / ".gradio-cache").resolve()
        assert not (root / ".gradio-cache" / "old-upload.png").exists()  # emptied at start
        assert page.delete_cache == (3600, app.CACHE_MAX_AGE_S)
        assert list_runs(root) == []
    finally:
        page.close()


def _square(lo: int, hi: int, size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[lo:hi, lo:hi] = True
    return mask


def test_overlapping_subjects_are_warned_of_with_the_share_of_the_smaller_mask():
    # Issue 24: two subjects painted over the same pixels passed without a word.
    from lowmcgm.ui.workspace import overlap_warnings

    a, b, c = _square(0, 10), _square(5, 25), _square(26, 32)  # a and b share 25 of a's 100 pixels
    said = overlap_warnings((Subject("<asset0>", "", a), Subject("<dog>", "", b), Subject("<asset2>", "", c)))
    assert said == ["warning: subjects 1 (<asset0>) and 2 (<dog>) overlap on 25% of the smaller mask: both "
                    "handles learn those pixels; erase them from one of the two."]
    assert "overlap on 100% of" in overlap_warnings((Subject("<a>", "", a), Subject("<b>", "", a | b)))[0]
    top, bottom = np.zeros((400, 400), bool), np.zeros((400, 400), bool)
    top[:300] = True
    bottom[300:] = True
    bottom[299, :100] = True  # a brush's spill: 100 of the smaller mask's 40,100 pixels
    assert "overlap on under 1% of" in overlap_warnings((Subject("<a>", "", top), Subject("<b>", "", bottom)))[0]
    assert overlap_warnings((Subject("<a>", "", a), Subject("<b>", "", c))) == []


def test_show_masks_and_start_warn_of_overlapping_subjects_but_go_on(tmp_path, monkeypatch):
    from lowmcgm.ui import jobs, page_state, subjects_tab, train_tab

    photo, a, b = make_photo(tmp_path)
    both = tmp_path / "both.png"  # subject 2 painted over subject 1 as well
    save_mask((load_mask(a) > 0.5) | (load_mask(b) > 0.5), both)
    uploads = [a, str(both), None, None]
    handles = ["<asset0>", "<box>", "", ""]
    said, shown_masks = subjects_tab.on_show_masks(photo, 2, *[None] * page_state.MAX_SUBJECTS, *uploads, *handles)
    assert said.startswith("2 subject mask(s) ready. warning: subjects 1 (&lt;asset0&gt;) and 2 (&lt;box&gt;) "
                           "overlap on 100% of the smaller mask"), said
    assert shown_masks is not None

    monkeypatch.setattr(jobs.TrainingJob, "start", lambda self: None)  # prepared, not trained
    state = page_state.PageState(tmp_path / "root", ("tiny",))
    said = train_tab.start_training(state, photo, 2, "r1", "tiny-cpu", "tiny", 0, None, None, *[None] * page_state.MAX_SUBJECTS,
                              *uploads, *handles, *[""] * page_state.MAX_SUBJECTS)
    assert said.startswith("Started run 'r1'. warning: subjects 1 (&lt;asset0&gt;) and 2 (&lt;box&gt;) overlap "
                           "on 100% of"), said
    assert (tmp_path / "root" / "r1" / "ui-run.json").is_file()


def _as_gradio_keeps(path: Path | str, root: Path) -> str:
    """A copy of ``path`` where gradio keeps an upload: ``<root>/.gradio-cache/<hash>/<its name>``."""
    import shutil

    copy = root / ".gradio-cache" / "0f3c9a7d1e2b" / Path(path).name
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, copy)
    return str(copy)


def test_errors_about_uploads_name_the_users_file_not_gradios_copy(tmp_path):
    # Issue 24: the page's errors named gradio's temporary copies (<root>/.gradio-cache/<hash>/...).
    from PIL import Image

    from lowmcgm.ui import page_state, sample_tab, subjects_tab, train_tab

    root = tmp_path / "root"
    photo, a, b = make_photo(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image\n")
    Image.fromarray(np.full((50, 40), 255, np.uint8)).save(tmp_path / "small mask.png")
    notes, small = _as_gradio_keeps(tmp_path / "notes.txt", root), _as_gradio_keeps(tmp_path / "small mask.png", root)
    cached_photo = _as_gradio_keeps(photo, root)
    no_canvas = [None] * page_state.MAX_SUBJECTS

    said = [subjects_tab.on_photo(notes)[1],
            subjects_tab.on_show_masks(cached_photo, 2, *no_canvas, small, _as_gradio_keeps(b, root), None, None,
                              *[""] * page_state.MAX_SUBJECTS)[0],
            train_tab.start_training(page_state.PageState(root, ("tiny",)), notes, 2, "r1", "tiny-cpu", "tiny", 0, *no_canvas,
                               a, b, None, None, *[""] * 2 * page_state.MAX_SUBJECTS),
            sample_tab.on_upload_artifact(page_state.PageState(root, ("tiny",)), notes)[0]]
    _untrained_run(root, "r2", 0)
    said.append(sample_tab.sample(page_state.PageState(root, ("tiny",)), "r2", "a photo of <asset0>", "", 1, 0, 2, 7.5, "none",
                           *no_canvas, notes, None, None, None, *[None] * page_state.MAX_SUBJECTS)[0])
    for text, name in zip(said, ("notes.txt", "small mask.png", "notes.txt", "notes.txt", "notes.txt")):
        assert text.startswith("error: ") and name in text and ".gradio-cache" not in text, text
    assert said[0] == "error: Image notes.txt is not an image PIL can read (PNG or JPEG expected)."


def test_the_memory_estimate_names_the_base_model_as_the_page_offers_it(tmp_path, monkeypatch):
    # Issue 24: the estimate named the resolved model, for the toy model a folder inside the package.
    from types import SimpleNamespace

    from lowmcgm.memory import estimate
    from lowmcgm.ui import page_state, train_tab

    traced = SimpleNamespace(model=str(tmp_path / "site-packages" / "lowmcgm" / "toy" / "model"), resolution=64,
                             phases=[SimpleNamespace(phase=1, peak_bytes=2**30)], peak_bytes=2**30)
    monkeypatch.setattr(estimate, "estimate", lambda cfg, model, timeout_s: traced)
    said = train_tab.on_estimate(page_state.PageState(tmp_path / "root", ("toy",)), "toy-cpu", "toy")
    assert said.startswith("**Estimated peak GPU memory** (base model toy, preset toy-cpu, 64 px, traced"), said
    assert "site-packages" not in said and "- phase 1: 1.00 GiB" in said
