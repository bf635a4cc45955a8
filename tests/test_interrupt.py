"""Training survives interruption: SIGKILL and Ctrl-C resume to the same artifact, NaN/inf and CUDA
out-of-memory stop with a message that says what to do, and the last good checkpoint stays intact.

The kill tests run the real ``lowmcgm`` command in a subprocess on the tiny model. Every run uses
the same relative ``--out run`` from its own working folder, so the artifact's embedded config is
the same and the files can be compared byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_photo

from lowmcgm.artifact import load_checkpoint, read_header
from lowmcgm.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, main
from lowmcgm.console.oom import training_oom_message
from lowmcgm.config import resolve_config
from lowmcgm.errors import UserError
from lowmcgm.training import checkpoints
from lowmcgm.training import step as trainer_step
from lowmcgm.training.checkpoints import CHECKPOINT_NAME
from lowmcgm.training.trainer import train

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
STEPS = ["--set", "train.phase1_steps=8", "--set", "train.phase2_steps=8", "--set", "train.checkpoint_every=2"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    photo, a, b = make_photo(tmp_path_factory.mktemp("inputs"))
    return ["train", "--preset", "tiny-cpu", "--base-model", "tiny", "--image", photo, "--mask", a, "--mask", b,
            "--out", "run", *STEPS]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "lowmcgm.cli", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _checkpoint_info(path: Path) -> dict | None:
    """Phase and step of the checkpoint at ``path`` (header only), or None before the first one."""
    if not path.is_file():
        return None
    _, meta = read_header(path)
    info = json.loads(meta["info"])
    return {"phase": info["phase"], "step": info["step"]}


def _wait_for_checkpoint(proc: subprocess.Popen, path: Path, phase: int) -> dict:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        info = _checkpoint_info(path)
        if info and info["phase"] >= phase:
            return info
        assert proc.poll() is None, f"the run ended before a phase-{phase} checkpoint: {proc.communicate()[1]}"
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint appeared")


@pytest.fixture(scope="module")
def straight(inputs, tmp_path_factory) -> Path:
    """The uninterrupted run, in-process (the same code and seed give the same bytes as a subprocess)."""
    cwd = tmp_path_factory.mktemp("straight")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(inputs) == 0
    finally:
        os.chdir(before)
    return cwd / "run"


def _assert_same_run(run: Path, straight: Path) -> None:
    _same_artifacts(run / "lowmcgm.safetensors", straight / "lowmcgm.safetensors")  # names the tensor if not
    _, left = read_header(run / "lowmcgm.safetensors")
    _, right = read_header(straight / "lowmcgm.safetensors")
    assert {k: v for k, v in left.items() if right.get(k) != v} == {}
    assert _sha(run / "lowmcgm.safetensors") == _sha(straight / "lowmcgm.safetensors")  # the bytes too
    history = [json.loads((folder / "loss_history.json").read_text()) for folder in (run, straight)]
    assert history[0] == history[1]
    assert not list(run.rglob(".*.tmp-*")), "half-written files left behind"


def test_ctrl_c_then_sigkill_then_resume_gives_the_uninterrupted_artifact(inputs, straight, tmp_path):
    """Ctrl-C in phase 1 (exit 130, checkpoint), resume, SIGKILL in phase 2, resume: the same bytes."""
    checkpoint = tmp_path / "run" / CHECKPOINT_NAME
    proc = _start(inputs, tmp_path)
    _wait_for_checkpoint(proc, checkpoint, phase=1)
    proc.send_signal(signal.SIGINT)
    code, err = _finish(proc)
    assert code == EXIT_INTERRUPTED, err
    assert "saved checkpoint" in err and "continue with --resume" in err and "Traceback" not in err
    stopped = _checkpoint_info(checkpoint)
    assert stopped["phase"] == 1 and not (tmp_path / "run" / "lowmcgm.safetensors").exists()

    proc = _start(inputs + ["--resume"], tmp_path)
    seen = _wait_for_checkpoint(proc, checkpoint, phase=2)
    proc.send_signal(signal.SIGKILL)
    code, _ = _finish(proc)
    assert code == -signal.SIGKILL and not (tmp_path / "run" / "lowmcgm.safetensors").exists()
    killed = _checkpoint_info(checkpoint)
    assert killed["phase"] == 2 and killed["step"] >= seen["step"]
    # What a kill during a checkpoint write leaves: a temporary of the dead process, removed on resume.
    (checkpoint.parent / f".last.safetensors.tmp-{proc.pid}").write_bytes(b"half a checkpoint")

    code, err = _finish(_start(inputs + ["--resume"], tmp_path))
    assert code == 0, err
    _assert_same_run(tmp_path / "run", straight)


# ------------------------------------------------------------------------------------------------
# In-process: where exactly Ctrl-C and NaN stop, and what the checkpoint then holds
# ------------------------------------------------------------------------------------------------

def _cfg(photo, out: Path, **overrides):
    image, a, b = photo
    base = {"data.image": image, "data.masks": [a, b], "output.out": str(out), "train.phase1_steps": 6,
            "train.phase2_steps": 4, "train.checkpoint_every": 2}
    return resolve_config("tiny-cpu", None, base | overrides)


def _on_call(monkeypatch, number: int, action) -> None:
    """Run ``action`` inside the ``number``-th step's loss computation (1-based, over both phases)."""
    real = trainer_step.compute_step_loss
    calls = []

    def wrapped(setup, batch, text_cache=None):
        calls.append(1)
        loss, parts = real(setup, batch, text_cache)
        return (action(loss) if len(calls) == number else loss), parts

    monkeypatch.setattr(trainer_step, "compute_step_loss", wrapped)


def _error_line(stderr: str) -> str:
    """The one 'error:' line, which ends stderr (progress lines may come before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    assert "Traceback" not in stderr
    return errors[0]


def _same_artifacts(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.fixture
def reference(photo, tmp_path) -> Path:
    return train(_cfg(photo, tmp_path / "straight"))


def test_ctrl_c_mid_step_stops_after_that_step(photo, tmp_path, monkeypatch, reference):
    """SIGINT arrives inside step 3, after its batch was drawn: the step finishes, then the run stops.

    A KeyboardInterrupt raised on the spot would save a generator already advanced by step 3's
    batch, and the resumed run would train on other batches than the uninterrupted one.
    """
    def interrupt(loss):
        os.kill(os.getpid(), signal.SIGINT)
        return loss

    _on_call(monkeypatch, 3, interrupt)
    cfg = _cfg(photo, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    _, _, info = load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)
    assert (info["phase"], info["step"]) == (1, 3)
    monkeypatch.undo()
    _same_artifacts(train(cfg, resume=True), reference)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is handed back


def test_second_ctrl_c_stops_at_once_without_a_checkpoint(photo, tmp_path, monkeypatch):
    def interrupt_twice(loss):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return loss

    _on_call(monkeypatch, 1, interrupt_twice)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(photo, tmp_path / "b"))
    assert not (tmp_path / "b" / CHECKPOINT_NAME).exists()


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(photo, tmp_path, monkeypatch, capsys,
                                                                       reference):
    """NaN at step 5 (checkpoints every 2 steps): exit 2 naming step, cause and fix; step 4's checkpoint intact."""
    saved = []
    real_save = checkpoints.save_checkpoint

    def spy(path, *args):
        real_save(path, *args)
        saved.append(_sha(Path(path)))

    monkeypatch.setattr(checkpoints, "save_checkpoint", spy)
    _on_call(monkeypatch, 5, lambda loss: loss * float("nan"))
    image, a, b = photo
    out = tmp_path / "b"
    args = ["train", "--preset", "tiny-cpu", "--image", image, "--mask", a, "--mask", b, "--out", str(out),
            "--set", "train.phase1_steps=6", "--set", "train.phase2_steps=4", "--set", "train.checkpoint_every=2"]
    assert main(args) == EXIT_USER_ERROR
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("error: Training stopped: the loss became NaN/inf at step 5 of phase 1")
    assert "mixed_precision=bf16" in err and "lower train.lora_lr" in err and "last good checkpoint" in err
    checkpoint = out / CHECKPOINT_NAME
    assert len(saved) == 2 and _sha(checkpoint) == saved[-1]  # step 4's, untouched since
    weights, _, info = load_checkpoint(checkpoint)
    assert (info["phase"], info["step"]) == (1, 4) and all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "lowmcgm.safetensors").exists()
    monkeypatch.undo()
    _same_artifacts(train(_cfg(photo, out), resume=True), reference)


def test_exploding_weights_never_replace_the_last_good_checkpoint(photo, tmp_path, monkeypatch):
    """Weights blown up to inf after a real optimizer step; a checkpoint, if any, stays finite.

    The learning rates that once blew the weights up for real (1e30) are refused now (issue 23:
    every number has bounds), so the step itself is followed by the blow-up."""
    real_step, steps = trainer_step.train_step, []

    def exploding_step(setup, state):
        losses = real_step(setup, state)
        steps.append(state.step)
        if len(steps) == 3:
            with torch.no_grad():
                setup.mcgm.handles.vectors.mul_(float("inf"))
        return losses

    monkeypatch.setattr(trainer_step, "train_step", exploding_step)
    cfg = _cfg(photo, tmp_path / "b", **{"train.checkpoint_every": 1})
    with pytest.raises(UserError, match="NaN/inf") as info:
        train(cfg)
    assert "learning rate" in str(info.value)
    checkpoint = tmp_path / "b" / CHECKPOINT_NAME
    if checkpoint.exists():
        weights, _, _ = load_checkpoint(checkpoint)
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_resume_may_lower_the_learning_rate_after_a_nan(photo, tmp_path, monkeypatch):
    """The fix a NaN message names (lower learning rate, other precision) may be applied on --resume."""
    def stop_at_step_4(event):
        if event["kind"] == "step" and event["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(photo, tmp_path / "b"), on_progress=stop_at_step_4)
    lower = _cfg(photo, tmp_path / "b", **{"train.handle_lr": 1e-4, "model.mixed_precision": "bf16"})
    seen = []
    real_step = trainer_step.train_step

    def spy(setup, state):
        seen.append(state.optimizer.param_groups[0]["lr"])
        return real_step(setup, state)

    monkeypatch.setattr(trainer_step, "train_step", spy)
    train(lower, resume=True)
    assert seen[0] == 1e-4  # the new rate, not the checkpoint's


# ------------------------------------------------------------------------------------------------
# CUDA out of memory
# ------------------------------------------------------------------------------------------------

def test_cuda_out_of_memory_is_a_user_error_with_advice(photo, tmp_path, monkeypatch, capsys):
    """Raised by a training step; the estimate fails too (as for a model it cannot read): still one line."""
    def oom(setup, state):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer_step, "train_step", oom)
    monkeypatch.setattr("lowmcgm.memory.estimate.estimate", lambda *a, **k: 1 / 0)
    image, a, b = photo
    code = main(["train", "--preset", "tiny-cpu", "--image", image, "--mask", a, "--out", str(tmp_path / "o")])
    stderr = capsys.readouterr().err
    err = _error_line(stderr)
    assert code == EXIT_USER_ERROR and err.startswith("error: CUDA ran out of memory during training")
    assert "smaller preset" in err and "GiB" not in err


def test_out_of_memory_advice_gives_the_estimate_and_the_preset_for_the_card(monkeypatch, photo, tmp_path):
    from lowmcgm.memory import estimate as estimate_mod

    class Card:
        total_memory = 8 * 2**30 - 300 * 2**20  # an "8 GB" card as CUDA reports it

    class Traced:
        peak_bytes = 7 * 2**30

    asked = []
    monkeypatch.setattr(estimate_mod, "estimate", lambda cfg, model, **kw: asked.append(model) or Traced())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Card())
    cfg = _cfg(photo, tmp_path)
    text = training_oom_message(cfg, "8gb")
    assert asked == ["tiny"] and "these settings peak at 7.0 GiB and need a card of 8.3 GiB" in text
    assert "This card has 7.7 GiB: try --preset 6gb." in text
    assert "try --preset 8gb." in training_oom_message(cfg, "12gb")
    # An SDXL run is sent to the SDXL presets, and from the smallest one to none.
    assert "try --preset sdxl-8gb." in training_oom_message(cfg, "sdxl-12gb")
    assert "This card has 7.7 GiB: try --preset sdxl-6gb." in training_oom_message(cfg, "sdxl-8gb")
    assert "This card has 7.7 GiB." in training_oom_message(cfg, "sdxl-6gb")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: 1 / 0)
    monkeypatch.setattr(estimate_mod, "estimate", lambda *a, **k: 1 / 0)
    text = training_oom_message(cfg, "8gb")
    assert text.startswith("CUDA ran out of memory during training") and "GiB" not in text  # no figures


# ------------------------------------------------------------------------------------------------
# SIGTERM and SIGHUP stop like Ctrl-C (issue 13, class 3); sample has no --resume (class 11)
# ------------------------------------------------------------------------------------------------

def test_sigterm_then_resume_gives_the_uninterrupted_artifact(inputs, straight, tmp_path):
    """docker stop / a preemption: SIGTERM in phase 2 saves a checkpoint, says how to resume, exits 143."""
    checkpoint = tmp_path / "run" / CHECKPOINT_NAME
    proc = _start(inputs, tmp_path)
    seen = _wait_for_checkpoint(proc, checkpoint, phase=2)
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM: stopping after this step" in err and "saved checkpoint" in err
    assert "Interrupted (SIGTERM); continue with --resume" in err and "Traceback" not in err
    stopped = _checkpoint_info(checkpoint)
    assert stopped["phase"] == 2 and stopped["step"] >= seen["step"]
    assert not (tmp_path / "run" / "lowmcgm.safetensors").exists()
    assert not (tmp_path / "run" / ".lowmcgm.lock").exists()  # released on the way out

    code, err = _finish(_start(inputs + ["--resume"], tmp_path))
    assert code == 0, err
    _assert_same_run(tmp_path / "run", straight)


@pytest.fixture
def sighup_as_in_a_terminal():
    """SIGHUP at its default, as a terminal leaves it (a runner started under nohup has it ignored)."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, previous)


def test_sighup_mid_step_checkpoints_and_exits_129(photo, tmp_path, monkeypatch, capsys, reference,
                                                  sighup_as_in_a_terminal):
    """A closed ssh session: SIGHUP inside step 3 finishes the step, checkpoints, exits 128 + 1."""
    _on_call(monkeypatch, 3, lambda loss: os.kill(os.getpid(), signal.SIGHUP) or loss)
    image, a, b = photo
    out = tmp_path / "b"
    args = ["train", "--preset", "tiny-cpu", "--image", image, "--mask", a, "--mask", b, "--out", str(out),
            "--set", "train.phase1_steps=6", "--set", "train.phase2_steps=4", "--set", "train.checkpoint_every=2"]
    assert main(args) == 128 + signal.SIGHUP
    err = capsys.readouterr().err
    assert "Interrupted (SIGHUP); continue with --resume" in err and "Traceback" not in err
    _, _, info = load_checkpoint(out / CHECKPOINT_NAME)
    assert (info["phase"], info["step"]) == (1, 3)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # every handler is handed back
    monkeypatch.undo()
    assert main(args + ["--resume"]) == 0
    _same_artifacts(out / "lowmcgm.safetensors", reference)


def test_under_nohup_sighup_stays_ignored(photo, tmp_path, monkeypatch, capsys, reference):
    """``nohup lowmcgm train ...``: a closed terminal must not stop the run it was asked to survive."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        _on_call(monkeypatch, 3, lambda loss: os.kill(os.getpid(), signal.SIGHUP) or loss)
        image, a, b = photo
        out = tmp_path / "b"
        assert main(["train", "--preset", "tiny-cpu", "--image", image, "--mask", a, "--mask", b, "--out", str(out),
                     "--set", "train.phase1_steps=6", "--set", "train.phase2_steps=4"]) == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    _same_artifacts(out / "lowmcgm.safetensors", reference)


def test_interrupted_sample_points_to_overwrite_not_resume(photo, tmp_path, monkeypatch, capsys):
    from lowmcgm.sampling import sampler

    image, a, b = photo
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny-cpu", "--image", image, "--mask", a, "--mask", b, "--out", str(run),
                 "--set", "train.phase1_steps=1", "--set", "train.phase2_steps=1"]) == 0
    real = sampler.PoseSampler.generate
    calls = []

    def stop_on_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(sampler.PoseSampler, "generate", stop_on_second)
    out = tmp_path / "samples"
    args = ["sample", "--artifact", str(run / "lowmcgm.safetensors"), "--prompt", "a photo of <asset0>",
            "--steps", "1", "--num-images", "3", "--out", str(out)]
    capsys.readouterr()
    assert main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("Interrupted (SIGTERM); sampling cannot resume") and "--overwrite" in err
    assert "--resume" not in err
    assert sorted(p.name for p in out.iterdir()) == ["p00-000-seed0.png"]  # whole files only
    monkeypatch.undo()
    assert main(args) == EXIT_USER_ERROR  # the earlier, partial samples are not mixed in silently
    assert main(args + ["--overwrite"]) == 0
    assert len(list(out.glob("p00-*.png"))) == 3


# ------------------------------------------------------------------------------------------------
# --resume compares contents, names what differs, refuses another base model before writing (class 4)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def checkpointed(tmp_path, capsys) -> tuple[list[str], Path]:
    """A run in tmp_path/run with a checkpoint (phase 2, step 1), its photo and masks in tmp_path/in."""
    folder = tmp_path / "in"
    folder.mkdir()
    photo, a, b = make_photo(folder)
    args = ["train", "--preset", "tiny-cpu", "--image", photo, "--mask", a, "--mask", b, "--out", str(tmp_path / "run"),
            "--set", "train.phase1_steps=2", "--set", "train.phase2_steps=2", "--set", "train.checkpoint_every=1"]
    assert main(args) == 0
    capsys.readouterr()
    return args, tmp_path / "run"


def _files_of(run: Path) -> dict[Path, str]:
    return {p: _sha(p) for p in run.rglob("*") if p.is_file()}


def _resume_refused(capsys, args: list[str], run: Path, *fragments: str) -> None:
    before = _files_of(run)
    assert main(args + ["--resume"]) == EXIT_USER_ERROR
    err = _error_line(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert _files_of(run) == before  # config.toml, artifact and checkpoint untouched


def test_resume_refuses_swapped_masks_under_the_same_paths(checkpointed, capsys):
    args, run = checkpointed
    a, b = Path(args[args.index("--mask") + 1]), Path(args[args.index("--mask") + 3])
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    _resume_refused(capsys, args, run, "data.masks: mask 1", "masks swapped?", "mask 2")


def test_resume_refuses_a_rotated_photo_under_the_same_path(checkpointed, capsys):
    from PIL import Image

    args, run = checkpointed
    photo = Path(args[args.index("--image") + 1])
    Image.open(photo).transpose(Image.Transpose.ROTATE_90).save(photo)
    _resume_refused(capsys, args, run, f"data.image {photo} has other contents than the checkpoint's photo")


def test_resume_names_the_setting_that_differs(checkpointed, capsys):
    args, run = checkpointed
    _resume_refused(capsys, args + ["--set", "train.seed=7", "--set", "loss.attn_weight=0.5"], run,
                    "loss.attn_weight is 0.5, the checkpoint's 0.01", "train.seed is 7, the checkpoint's 0")


def test_resume_takes_the_same_files_under_another_spelling(checkpointed, tmp_path, capsys):
    args, run = checkpointed
    (tmp_path / "elsewhere").symlink_to(tmp_path / "in")
    respelled = [a.replace(str(tmp_path / "in"), str(tmp_path / "elsewhere" / "." )) for a in args]
    assert respelled != args
    assert main(respelled + ["--resume"]) == 0, capsys.readouterr().err


def test_resume_refuses_another_base_model_before_writing(checkpointed, capsys):
    args, run = checkpointed
    _resume_refused(capsys, args + ["--base-model", "tiny-v"], run, "was trained on base model 'tiny'",
                    "'tiny-v' is another model")


def test_resume_ignores_how_the_run_samples_afterwards(photo, tmp_path):
    """The [sample] section changes no trained weight: `run --resume` may sample another way."""
    cfg = _cfg(photo, tmp_path / "run")
    other = _cfg(photo, tmp_path / "run", **{"sample.steps": "3", "sample.scheduler": "ddim"})
    assert other.sample != cfg.sample
    assert checkpoints.training_identity(other) == checkpoints.training_identity(cfg)
