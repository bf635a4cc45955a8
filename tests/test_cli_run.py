"""``lowmcgm run``: photo to grid in one process, previews during training, same images as ``sample``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_photo
from PIL import Image
from safetensors.torch import load_file

from lowmcgm.cli import EXIT_USER_ERROR, main
from lowmcgm.sampling.records import read_png_parameters


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    photo, a, b = make_photo(tmp_path_factory.mktemp("cli_run"))
    return {"photo": Path(photo), "a": Path(a), "b": Path(b)}


def run_args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["run", "--preset", "tiny-cpu", "--base-model", "tiny", "--image", str(inputs["photo"]),
            "--mask", str(inputs["a"]), "--mask", str(inputs["b"]), "--out", str(out), *extra]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_run_goes_from_photo_to_grid_and_draws_what_sample_draws(inputs, tmp_path):
    out = tmp_path / "run"
    sampling = ["--prompt", "a photo of <asset1> and <asset0> in the snow", "--pose", f"asset0={inputs['b']}",
                "--pose", f"asset1={inputs['a']}", "--num-images", "2", "--steps", "8", "--seed", "3"]
    assert main(run_args(inputs, out, *sampling, "--preview-every", "10")) == 0

    assert (out / "lowmcgm.safetensors").is_file()
    # tiny-cpu trains 20 + 20 steps; previews before training and every 10 steps of each phase.
    steps = [0, 10, 20, 30, 40]
    assert sorted(p.name for p in (out / "previews").iterdir()) == sorted(
        [f"step{s:05d}.png" for s in steps] + [f"step{s:05d}-attention.png" for s in steps])
    attention = Image.open(out / "previews" / "step00040-attention.png")
    assert attention.width >= 5 * 128  # the image, two handles, two mask tokens
    assert read_png_parameters(out / "previews" / "step00010.png")["seed"] == 3
    assert Image.open(out / "loss_curve.png").height > 140
    index = json.loads((out / "samples" / "samples.json").read_text())
    files = [im["file"] for im in index["prompts"][0]["images"]]
    assert len(files) == 2 and (out / "samples" / "grid.png").is_file()

    # The in-memory model, after the artifact is written over it, is the model `sample` loads.
    again = tmp_path / "again"
    assert main(["sample", "--artifact", str(out / "lowmcgm.safetensors"), "--out", str(again), *sampling]) == 0
    for name in files:
        np.testing.assert_array_equal(pixels(out / "samples" / name), pixels(again / name))


def test_previews_do_not_change_training(inputs, tmp_path):
    short = ["--set", "train.phase1_steps=3", "--set", "train.phase2_steps=3", "--set", "train.checkpoint_every=0"]
    assert main(run_args(inputs, tmp_path / "with", *short, "--preview-every", "1", "--steps", "2",
                         "--num-images", "1")) == 0
    assert len(list((tmp_path / "with" / "previews").glob("step*-attention.png"))) == 7
    assert main(["train", *run_args(inputs, tmp_path / "without", *short)[1:]]) == 0
    with_previews = load_file(tmp_path / "with" / "lowmcgm.safetensors")
    without = load_file(tmp_path / "without" / "lowmcgm.safetensors")
    assert with_previews.keys() == without.keys()
    for key, value in without.items():
        assert value.equal(with_previews[key]), key


def test_run_refuses_a_bad_pose_before_training(inputs, tmp_path, capsys):
    rc = main(run_args(inputs, tmp_path / "bad", "--prompt", "a photo of <asset0>", "--pose", "asset5=x.png"))
    assert rc == EXIT_USER_ERROR
    assert "no such handle" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "lowmcgm.safetensors").exists()


def test_run_writes_its_sample_section_with_the_effective_config(inputs, tmp_path):
    import tomllib

    out, prompt = tmp_path / "run", ["--prompt", "a photo of <asset0> in the snow"]
    short = ["--set", "train.phase1_steps=2", "--set", "train.phase2_steps=2", "--set", "train.checkpoint_every=0",
             "--preview-every", "0"]
    assert main(run_args(inputs, out, *short, *prompt, "--set", "sample.scheduler=ddim", "--set", "sample.steps=5",
                         "--steps", "2", "--num-images", "1", "--guidance", "none")) == 0
    written = tomllib.loads((out / "config.toml").read_text())["sample"]
    assert (written["scheduler"], written["steps"], written["num_images"], written["pose_guidance"]) == \
        ("ddim", 2, 1, "none")
    used = json.loads((out / "samples" / "samples.json").read_text())
    automatic = ("dtype", "height", "width")  # '' and 0 in the config, resolved when sampling
    assert {k: v for k, v in written.items() if k not in automatic} == \
        {k: v for k, v in used["settings"].items() if k not in automatic}

    # The run's config.toml gives `sample` the same settings, and so the same images.
    again = tmp_path / "again"
    assert main(["sample", "--artifact", str(out / "lowmcgm.safetensors"), "--out", str(again), *prompt,
                 "--config", str(out / "config.toml")]) == 0
    assert json.loads((again / "samples.json").read_text())["settings"] == used["settings"]
    name = used["prompts"][0]["images"][0]["file"]
    np.testing.assert_array_equal(pixels(out / "samples" / name), pixels(again / name))


@pytest.mark.parametrize("fp8", [[], ["model.fp8_base=true"],
                                 ["model.fp8_text_encoders=true", "model.text_encoder_checkpointing=true"]],
                         ids=["fp16-or-fp32", "fp8-base", "fp8-text-encoders"])
def test_run_on_sdxl_trains_previews_and_draws_what_sample_draws(inputs, tmp_path, fp8):
    out = tmp_path / "xl"
    sampling = ["--prompt", "a photo of <asset0> and <asset1>", "--pose", f"asset0={inputs['b']}",
                "--num-images", "1", "--steps", "4", "--seed", "5"]
    # With model.fp8_base (fp8_text_encoders), `sample` stores the fresh UNet (text encoders) in fp8
    # as training did: the same images.
    args = run_args(inputs, out, *sampling, "--set", "train.phase1_steps=3", "--set", "train.phase2_steps=3",
                    "--preview-every", "3", *[arg for setting in fp8 for arg in ("--set", setting)])
    args[args.index("tiny")] = "tiny-xl"
    assert main(args) == 0
    assert sorted(p.name for p in (out / "previews").glob("step*[0-9].png")) == [
        "step00000.png", "step00003.png", "step00006.png"]
    files = [im["file"] for im in json.loads((out / "samples" / "samples.json").read_text())["prompts"][0]["images"]]
    again = tmp_path / "again"
    assert main(["sample", "--artifact", str(out / "lowmcgm.safetensors"), "--out", str(again), *sampling]) == 0
    np.testing.assert_array_equal(pixels(out / "samples" / files[0]), pixels(again / files[0]))
