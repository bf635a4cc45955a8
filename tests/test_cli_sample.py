"""``lowmcgm sample`` end to end on a trained tiny artifact: files written, and each user error exits 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_photo
from PIL import Image

from lowmcgm.artifact import file_sha256
from lowmcgm.cli import EXIT_USER_ERROR, build_parser, main
from lowmcgm.config import SampleSettings
from lowmcgm.sampling.records import read_png_parameters

def draw_inputs(folder: Path) -> dict[str, Path]:
    """conftest's photo and two masks, plus a text file where a mask is expected."""
    photo, a, b = make_photo(folder)
    (folder / "notes.txt").write_text("not an image")
    return {"photo": Path(photo), "a": Path(a), "b": Path(b), "text": folder / "notes.txt"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli_sample")
    paths = draw_inputs(folder)
    rc = main(["train", "--preset", "tiny-cpu", "--base-model", "tiny", "--image", str(paths["photo"]),
               "--mask", str(paths["a"]), "--mask", str(paths["b"]), "--set", "train.phase1_steps=2",
               "--set", "train.phase2_steps=2", "--set", "train.checkpoint_every=0", "--out", str(folder / "run")])
    assert rc == 0
    return paths | {"artifact": folder / "run" / "lowmcgm.safetensors", "folder": folder}


def sample_args(trained: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["sample", "--artifact", str(trained["artifact"]), "--steps", "2", "--num-images", "2",
            "--out", str(out), *extra]


def test_sample_writes_images_grid_and_index(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a photo of <asset0> on the grass | asset0={trained['b']}\n")
    rc = main(sample_args(trained, tmp_path / "out", "--prompt", "a photo of <asset1> and <asset0>",
                          "--pose", f"asset0={trained['a']}", "--pose", f"<asset1>={trained['b']}",
                          "--prompts", str(prompts), "--seed", "5", "--scheduler", "euler_a"))
    assert rc == 0
    out = tmp_path / "out"
    index = json.loads((out / "samples.json").read_text())
    assert index["artifact_sha256"] == file_sha256(trained["artifact"])
    assert [p["poses"] for p in index["prompts"]] == [
        {"<asset1>": str(trained["b"]), "<asset0>": str(trained["a"])},
        {"<asset0>": str(trained["b"])},  # the line's own pose beats --pose
    ]
    files = sorted(p.name for p in out.glob("p*.png"))
    assert files == ["p00-000-seed5.png", "p00-001-seed6.png", "p01-000-seed5.png", "p01-001-seed6.png"]
    meta = read_png_parameters(out / "p01-001-seed6.png")
    assert (meta["prompt"], meta["seed"], meta["scheduler"]) == ("a photo of <asset0> on the grass", 6, "euler_a")
    assert meta["artifact_sha256"] == index["artifact_sha256"]
    assert Image.open(out / "grid.png").height > 2 * 128


def test_no_mask_and_base_recorded_in_the_artifact(trained, tmp_path):
    rc = main(sample_args(trained, tmp_path, "--prompt", "a photo of <asset0>", "--no-mask", "--num-images", "1"))
    assert rc == 0
    meta = read_png_parameters(next(tmp_path.glob("p00-*.png")))
    assert (meta["mask_tokens"], meta["poses"], meta["base_model"]) == ("off", {}, "tiny")


USER_ERRORS = {
    "handle the artifact lacks": (["--prompt", "a photo of <asset7>"], "does not have"),
    "pose for a missing handle": (["--prompt", "a photo of <asset0>", "--pose", "asset9={a}"], "no such handle"),
    "pose no prompt names": (["--prompt", "a photo of <asset0>", "--pose", "asset1={a}"], "no prompt names"),
    "pose not an image": (["--prompt", "a photo of <asset0>", "--pose", "asset0={text}"], "not an image"),
    "pose file missing": (["--prompt", "a photo of <asset0>", "--pose", "asset0=/no/such.png"], "not found"),
    "pose without =": (["--prompt", "a photo of <asset0>", "--pose", "asset0"], "HANDLE=FILE"),
    "pose with --no-mask, unguided": (["--prompt", "a photo of <asset0>", "--pose", "all={a}", "--no-mask",
                                       "--guidance", "none"], "no effect"),
    "no prompt": ([], "No prompt"),
    "prompts file missing": (["--prompts", "/no/such/prompts.txt"], "Prompts file not found"),
    "height not a multiple of 8": (["--prompt", "a photo", "--height", "30"], "multiple of 8"),
    "base of another architecture": (["--prompt", "a photo of <asset0>", "--base-model", "tiny-v"],
                                     "was made for base model 'tiny'"),
}


@pytest.mark.parametrize("case", USER_ERRORS.values(), ids=USER_ERRORS.keys())
def test_user_errors_exit_2_with_one_line(trained, tmp_path, capsys, case):
    extra, fragment = case
    extra = [e.format(a=trained["a"], text=trained["text"]) for e in extra]
    assert main(sample_args(trained, tmp_path / "out", *extra)) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert fragment in err and err.startswith("error: ") and "\n" not in err
    assert not list((tmp_path / "out").glob("*.png"))


def test_missing_artifact_exits_2(tmp_path, capsys):
    assert main(["sample", "--artifact", str(tmp_path / "none.safetensors"), "--prompt", "a photo",
                 "--out", str(tmp_path)]) == EXIT_USER_ERROR
    assert "not found" in capsys.readouterr().err


def test_installed_command_refuses_a_mismatched_base(trained, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowmcgm.cli", *sample_args(
        trained, tmp_path, "--prompt", "a photo of <asset0>", "--base-model", "tiny-v")],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == EXIT_USER_ERROR
    assert "error: " in proc.stderr and "made for base model 'tiny'" in proc.stderr


def test_help_defaults_match_sample_settings():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["sample"]
    defaults = SampleSettings()
    for action in sub._actions:
        found = re.search(r"\(default ([^)]+)\)", action.help or "")
        field = action.dest
        if not found or not hasattr(defaults, field) or not isinstance(getattr(defaults, field), (int, float)):
            continue
        assert found.group(1) == str(getattr(defaults, field)), field
    assert "(default dpmpp_2m)" in next(a.help for a in sub._actions if a.dest == "scheduler")


@pytest.mark.parametrize("mode", ["attention", "latent"])
def test_pose_guidance_flags_reach_the_png_and_the_index(trained, tmp_path, mode):
    rc = main(sample_args(trained, tmp_path / "out", "--prompt", "a photo of <asset0>", "--pose",
                          f"asset0={trained['a']}", "--guidance", mode, "--guidance-strength", "2.5",
                          "--guidance-steps", "1"))
    assert rc == 0
    meta = read_png_parameters(tmp_path / "out" / "p00-000-seed0.png")
    assert (meta["pose_guidance"], meta["pose_guidance_strength"], meta["pose_guidance_steps"]) == (mode, 2.5, 1)
    settings = json.loads((tmp_path / "out" / "samples.json").read_text())["settings"]
    assert (settings["pose_guidance"], settings["pose_guidance_strength"]) == (mode, 2.5)


@pytest.mark.parametrize("mode", ["attention", "latent"])
def test_posed_sample_of_another_aspect_has_the_asked_size(trained, tmp_path, mode):
    rc = main(sample_args(trained, tmp_path / "out", "--prompt", "a photo of <asset0>", "--pose",
                          f"asset0={trained['a']}", "--guidance", mode, "--width", "96", "--height", "64"))
    assert rc == 0
    image = tmp_path / "out" / "p00-000-seed0.png"
    assert Image.open(image).size == (96, 64)
    assert (read_png_parameters(image)["width"], read_png_parameters(image)["height"]) == (96, 64)


def test_default_guidance_is_recorded_with_its_strength_and_steps(trained, tmp_path):
    assert main(sample_args(trained, tmp_path / "out", "--prompt", "a photo of <asset0>", "--pose",
                            f"asset0={trained['a']}")) == 0
    meta = read_png_parameters(tmp_path / "out" / "p00-000-seed0.png")
    assert (meta["pose_guidance"], meta["pose_guidance_strength"], meta["pose_guidance_steps"]) == ("latent", 10.0, 1)


GUIDANCE_ERRORS = {
    "unknown mode": (["--guidance", "strong"], "invalid choice"),
    "nan strength": (["--guidance", "attention", "--guidance-strength", "nan"], "--guidance-strength must be"),
    "negative strength": (["--guidance", "latent", "--guidance-strength", "-1"], "--guidance-strength must be"),
    "more steps than sampled": (["--guidance", "attention", "--guidance-steps", "9"], "--guidance-steps must be"),
}


@pytest.mark.parametrize("case", GUIDANCE_ERRORS.values(), ids=GUIDANCE_ERRORS.keys())
def test_bad_guidance_values_get_one_line_and_exit_2(trained, tmp_path, capsys, case):
    flags, fragment = case
    try:
        rc = main(sample_args(trained, tmp_path / "out", "--prompt", "a photo of <asset0>", *flags))
    except SystemExit as exc:  # argparse refuses an unknown choice itself, with exit 2
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == EXIT_USER_ERROR and fragment in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", [
    ["data.use_affine_augmentation=true"], ["data.mask_dropout=0.5"], ["data.use_mask_perturbation=true"],
    ["loss.mask_encoder_input=area_normalized"], ["loss.mask_token_norm=layernorm"],
], ids=["affine", "mask-dropout", "perturbation", "area-normalized", "layernorm"])
def test_artifact_of_each_mask_aware_option_loads_and_samples(tmp_path, option):
    paths = draw_inputs(tmp_path)
    sets = [arg for item in option + ["train.phase1_steps=2", "train.phase2_steps=2", "train.checkpoint_every=0"]
            for arg in ("--set", item)]
    assert main(["train", "--preset", "tiny-cpu", "--base-model", "tiny", "--image", str(paths["photo"]),
                 "--mask", str(paths["a"]), "--mask", str(paths["b"]), *sets, "--out", str(tmp_path / "run")]) == 0
    rc = main(["sample", "--artifact", str(tmp_path / "run" / "lowmcgm.safetensors"), "--steps", "2",
               "--num-images", "1", "--out", str(tmp_path / "out"), "--prompt", "a photo of <asset0>",
               "--pose", f"asset0={paths['b']}"])
    assert rc == 0
    assert len(list((tmp_path / "out").glob("p*.png"))) == 1


def test_sample_section_from_preset_and_set_with_flags_beating_both(trained, tmp_path):
    preset = tmp_path / "sampling.toml"
    preset.write_text('# sampling settings\n[sample]\nscheduler = "ddim"\nsteps = 3\nseed = 9\n')
    # sample_args types --steps 2 and --num-images 2: they beat the file's steps = 3.
    assert main(sample_args(trained, tmp_path / "out", "--prompt", "a photo of <asset0>", "--preset", str(preset),
                            "--set", "sample.seed=4", "--set", "sample.guidance_scale=5")) == 0
    settings = json.loads((tmp_path / "out" / "samples.json").read_text())["settings"]
    assert (settings["scheduler"], settings["steps"], settings["seed"], settings["num_images"],
            settings["guidance_scale"]) == ("ddim", 2, 4, 2, 5.0)
    assert read_png_parameters(tmp_path / "out" / "p00-001-seed5.png")["scheduler"] == "ddim"


def test_set_sample_steps_without_a_flag(trained, tmp_path):
    assert main(["sample", "--artifact", str(trained["artifact"]), "--out", str(tmp_path / "out"), "--prompt",
                 "a photo of <asset0>", "--set", "sample.steps=3", "--set", "sample.num_images=1"]) == 0
    meta = read_png_parameters(tmp_path / "out" / "p00-000-seed0.png")
    assert meta["steps"] == 3 and len(list((tmp_path / "out").glob("p*.png"))) == 1


CONFIG_ERRORS = {
    "sample --set bad choice": (["sample", "--artifact", "{artifact}", "--out", "{out}", "--prompt", "a photo",
                                 "--set", "sample.scheduler=fast"],
                                "sample.scheduler must be one of ddim, euler_a, dpmpp_2m (got 'fast')"),
    "sample preset bad choice": (["sample", "--artifact", "{artifact}", "--out", "{out}", "--prompt", "a photo",
                                  "--preset", "{bad_preset}"], "sample.pose_guidance must be one of none, attention"),
    "run --set bad choice": (["run", "--preset", "tiny-cpu", "--set", "sample.dtype=fp8"],
                             "sample.dtype must be one of fp16, bf16, fp32 or empty (got 'fp8')"),
    "train --set bad choice (for comparison)": (["train", "--set", "model.mixed_precision=fp8"],
                                                "model.mixed_precision must be one of no, fp16, bf16 (got 'fp8')"),
    "sample --set of another section": (["sample", "--artifact", "{artifact}", "--out", "{out}", "--prompt",
                                         "a photo", "--set", "train.seed=3"],
                                        "--set train.seed has no effect on lowmcgm sample"),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_bad_sample_settings_are_config_errors_one_line_exit_2(trained, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr("lowmcgm.sampling.sampler.load_base_for", lambda *a: pytest.fail("weights loaded"))
    bad_preset = tmp_path / "bad.toml"
    bad_preset.write_text('[sample]\npose_guidance = "strong"\n')
    argv, fragment = case
    argv = [a.format(artifact=trained["artifact"], out=tmp_path / "out", bad_preset=bad_preset) for a in argv]
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err
    if "Invalid" in err:  # the same shape as every other config error
        assert err.startswith("error: Invalid configuration: ") and err.endswith(").")
    assert not (tmp_path / "out").exists()


def test_a_prompt_naming_no_handle_samples_with_one_warning_line(trained, tmp_path, capsys):
    rc = main(sample_args(trained, tmp_path / "out", "--num-images", "1", "--guidance", "none",
                          "--prompt", "a photo of <asset1>", "--prompt", "a photo of a dog on the grass"))
    assert rc == 0 and len(list((tmp_path / "out").glob("p01-*.png"))) == 1  # sampled all the same
    warned = [line for line in capsys.readouterr().err.splitlines() if "names no handle" in line]
    assert warned == ["warning: --prompt 2 names no handle (<asset0>, <asset1>), so its images show none of the "
                      "learned subjects."]
