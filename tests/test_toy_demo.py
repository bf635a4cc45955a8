"""``lowmcgm demo``: the inputs it renders, the run it makes of them, and its note on the weights."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import numpy as np
from PIL import Image
from test_toy_bundled import bundled_toy, toy_model_folder  # noqa: F401 (fixtures)

import lowmcgm.toy.demo as demo
import lowmcgm.toy.bundled as toy
from lowmcgm.cli import EXIT_USER_ERROR, main
from lowmcgm.sampling.prompts import load_prompts_file
from lowmcgm.toy.scenes import HELDOUT_COMBOS, render_scene, scene_combos

# The test trains and samples for a moment, not the preset's minutes.
SHORT_SET = (("train.phase1_steps", "2"), ("train.phase2_steps", "2"), ("train.checkpoint_every", "0"))
SHORT_FLAGS = (("sample.steps", 2), ("sample.num_images", 1), ("output.preview_every", 0))


def shorten(monkeypatch, seen: dict | None = None) -> None:
    """Make every demo run SHORT (recorded in ``seen["run"]``), as the demo's own flags and --set items."""
    made = demo.demo_run

    def short(*args, **kwargs):
        run = made(*args, **kwargs)
        run = dataclasses.replace(run, output_flags=run.output_flags + SHORT_FLAGS, overrides=SHORT_SET)
        if seen is not None:
            seen["run"] = run
        return run

    monkeypatch.setattr(demo, "demo_run", short)


def test_demo_inputs_are_the_scene_its_masks_and_new_poses(tmp_path):
    inputs = demo.write_demo_inputs(tmp_path, size_px=64)
    image, masks = render_scene(demo.DEMO_SCENE, 64)
    assert (np.asarray(Image.open(inputs.photo)) == image).all()
    for path, mask in zip(inputs.masks, masks):
        assert ((np.asarray(Image.open(path)) > 127) == mask).all()
    assert scene_combos(demo.DEMO_SCENE) <= set(HELDOUT_COMBOS)  # the base model never saw them captioned
    specs = load_prompts_file(inputs.prompts)
    assert len(specs) == len(demo.PROMPTS)
    for spec, (background, poses) in zip(specs, demo.PROMPTS):
        assert spec.text.endswith(f"the {background}")
        assert {h: Path(f).name for h, f in spec.poses.items()} == {h: f"{s}.png" for h, s in poses.items()}
        for handle, file in spec.poses.items():  # each pose is its own subject's kind
            assert Path(file).name.startswith(demo.INIT_WORDS[demo.HANDLES.index(handle)])
            assert (np.asarray(Image.open(file)) > 127).any()


def test_demo_trains_and_samples_the_toy_model(bundled_toy, tmp_path, monkeypatch, capsys):
    shorten(monkeypatch)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "have not been measured against their gate" in lines[0]  # the random folder's note
    assert lines[1].startswith("The demo is: lowmcgm run --preset toy-cpu --base-model toy")
    index = json.loads((out / "samples" / "samples.json").read_text())
    assert index["base_model"] == "toy"
    assert [p["poses"] for p in index["prompts"]] == [
        {h: f"{out / 'inputs' / s}.png" for h, s in poses.items()} for _, poses in demo.PROMPTS]
    assert (out / "samples" / "grid.png").is_file() and (out / "lowmcgm.safetensors").is_file()


def test_demo_without_bundled_weights_fails_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(toy, "toy_model_dir", lambda: tmp_path / "absent")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "not bundled in this install" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()


def test_note_stays_until_the_gate_is_passed(tmp_path):
    passed = {"gate": {"background_acc": True, "kind_acc": True, "psnr_db": True}, "gate_passed": True}
    for name, info, noted in (("unmeasured", {}, True), ("passed", passed, False)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "toyworld.json").write_text(json.dumps({"image_size_px": 64} | info))
        size_px, note = demo.describe_base(str(folder))
        assert size_px == 64 and (note is not None) is noted
    assert demo.describe_base("tiny")[1].startswith("'tiny' has random weights")


def test_demo_on_another_base_model_uses_the_same_run(tmp_path, monkeypatch):
    seen = {}
    shorten(monkeypatch, seen)
    assert main(["demo", "--out", str(tmp_path), "--base-model", "tiny"]) == 0
    assert seen["run"].command()[:5] == ["run", "--preset", "toy-cpu", "--base-model", "tiny"]


def test_printed_command_runs_the_same_configuration(tmp_path, monkeypatch, capsys):
    """The command line the demo prints, run through the CLI, writes the demo's own config.toml."""
    shorten(monkeypatch)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--base-model", "tiny", "--guidance", "attention"]) == 0
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("The demo is: "))
    demo_config = (out / "config.toml").read_text()
    assert 'pose_guidance = "attention"' in demo_config and "phase1_steps = 2" in demo_config
    argv = shlex.split(printed.removeprefix("The demo is: "))
    assert argv[0] == "lowmcgm"
    assert main(argv[1:] + ["--overwrite"]) == 0
    assert (out / "config.toml").read_text() == demo_config


def test_demo_run_config_is_its_flags_over_the_preset(tmp_path):
    inputs = demo.write_demo_inputs(tmp_path / "inputs", size_px=64)
    run = demo.demo_run(inputs, tmp_path, "tiny", overwrite=True, pose_guidance="none")
    cfg = run.config()
    assert cfg.model.base_model == "tiny" and cfg.train.phase1_steps == 400  # the toy-cpu preset's
    assert cfg.data.masks == tuple(map(str, inputs.masks)) and cfg.data.handles == demo.HANDLES
    assert cfg.data.init_words == demo.INIT_WORDS and cfg.output.out == str(tmp_path)
    assert (cfg.sample.num_images, cfg.sample.steps, cfg.sample.guidance_scale) == (2, 25, 5.0)
    assert cfg.sample.pose_guidance == "none"
    argv = run.command()
    assert argv[argv.index("--prompts") + 1] == str(inputs.prompts)
    assert argv[-5:] == ["--out", str(tmp_path), "--guidance", "none", "--overwrite"]
