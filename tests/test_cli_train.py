"""The real `lowmcgm` entry point on the tiny model: train, inspect, presets, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowmcgm.cli import main

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowmcgm.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def test_train_then_inspect(photo, tmp_path):
    image, a, b = photo
    out = tmp_path / "run"
    proc = run_cli("train", "--preset", "tiny-cpu", "--base-model", "tiny", "--image", image, "--mask", a,
                   "--mask", b, "--init-word", "dog", "--init-word", "cat", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    artifact = out / "lowmcgm.safetensors"
    assert artifact.is_file() and (out / "config.toml").is_file()
    assert "phase 2 step 20/20" in proc.stderr  # plain progress lines when not a terminal
    info = run_cli("inspect", str(artifact), "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["handles"] == ["<asset0>", "<asset1>"] and data["mask_tokens"] is True
    assert data["init_words"] == ["dog", "cat"] and data["training_config"]["train"]["phase1_steps"] == 20
    pretty = run_cli("inspect", str(artifact))
    assert "<asset0>" in pretty.stdout


def test_presets_and_keys_listing(capsys):
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    for name in ("tiny-cpu", "4gb", "6gb", "8gb", "12gb", "reference"):
        assert name in listing
    assert main(["config-keys"]) == 0
    assert "train.lora_lr" in capsys.readouterr().out


@pytest.mark.parametrize("extra,fragment", [
    (["--preset", "9gb"], "Unknown preset '9gb'"),
    (["--set", "train.lora_rl=1"], "Did you mean 'train.lora_lr'"),
    (["--base-model", "/no/such/model"], "neither a diffusers folder"),
    (["--handle", "<x>"], "give one per mask"),
], ids=["preset", "key", "base-model", "handles"])
def test_user_errors_exit_2_without_traceback(photo, tmp_path, capsys, extra, fragment):
    image, a, b = photo
    args = ["train", "--preset", "tiny-cpu", "--image", image, "--mask", a, "--mask", b,
            "--out", str(tmp_path / "o")]
    code = main(args + extra)
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "o" / "lowmcgm.safetensors").exists()


def test_missing_image_is_refused_before_weights_load(tmp_path, capsys):
    code = main(["train", "--preset", "tiny-cpu", "--image", str(tmp_path / "none.png"), "--mask",
                 str(tmp_path / "m.png"), "--out", str(tmp_path / "o")])
    assert code == 2 and "Image not found" in capsys.readouterr().err


@pytest.mark.slow
def test_accelerate_launch_with_two_processes(photo, tmp_path):
    image, a, b = photo
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lowmcgm.cli", "train",
         "--preset", "tiny-cpu", "--image", image, "--mask", a, "--mask", b, "--out", str(out),
         "--set", "train.phase1_steps=3", "--set", "train.phase2_steps=3"],
        capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "lowmcgm.safetensors").is_file()
