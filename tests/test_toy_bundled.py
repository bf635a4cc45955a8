"""``--base-model toy``: the bundled toy model's loading, its toyworld.json, and the pose benchmark.

The plumbing tests use a toy model folder built here from ``tools/train_toy_base.py``'s own
builders ("tiny" preset, random weights, saved in fp16 like the real export) and point
``lowmcgm.toy.bundled.toy_model_dir`` at it, so they need no trained weights and no file outside the
repository. The one test that judges the weights runs only once the bundled model has passed its
gate (``tools/eval_toy_base.py --record`` writes that into its ``toyworld.json``).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

import lowmcgm.toy.bundled as toy
from lowmcgm.errors import UserError
from lowmcgm.models.loading import load_base_model
from tools_loader import load_tool

REPO = Path(__file__).resolve().parents[1]
MAX_BUNDLED_BYTES = 30 * 2**20  # issue 7: the shipped weights stay under 30 MB


def make_toy_model(folder: Path, info: dict | None = None) -> Path:
    """A toy model folder as ``train_toy_base.py --stage export`` writes it, with random weights."""
    from diffusers import StableDiffusionPipeline

    ttb = load_tool("train_toy_base")
    cfg = ttb.ToyConfig(**ttb.PRESETS["tiny"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = ttb.build_tokenizer()
        pipe = StableDiffusionPipeline(
            vae=ttb.build_vae(cfg, 0.5), text_encoder=ttb.build_text_encoder(cfg, tokenizer),
            tokenizer=tokenizer, unet=ttb.build_unet(cfg), scheduler=ttb.build_scheduler(cfg),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    record = {"image_size_px": cfg.image_size_px, "attn_loss_downscale": ttb.ATTN_LOSS_DOWNSCALE,
              "attn_map_px": 16, "vae_step": 0, "unet_step": 0, "seed": 0,
              "heldout_combos": [list(c) for c in ttb.HELDOUT_COMBOS], "weights": "live"}
    (folder / "toyworld.json").write_text(json.dumps(record | (info or {}), indent=1))
    return folder


@pytest.fixture(scope="session")
def toy_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_model(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture
def bundled_toy(toy_model_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``--base-model toy`` loads the random toy folder."""
    monkeypatch.setattr(toy, "toy_model_dir", lambda: toy_model_folder)
    return toy_model_folder


def test_toy_loads_as_fp32_from_fp16_files(bundled_toy):
    from safetensors import safe_open

    with safe_open(str(bundled_toy / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    base = load_base_model("toy")
    assert base.name == "toy" and base.resolution == 64
    for module in (base.unet, base.vae, base.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert toy.load_toy_info().image_size_px == 64


def test_missing_toy_weights_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "toy_model_dir", lambda: tmp_path / "absent")
    with pytest.raises(UserError, match="not bundled in this install"):
        load_base_model("toy")
    assert toy.load_toy_info() is None


GATE_FIGURES = {"background_acc": 0.95, "kind_acc": 0.92, "psnr_db": 31.0}


@pytest.mark.parametrize("recorded, passed, phrase", [
    ({}, False, "not been measured"),
    ({"evaluation": GATE_FIGURES | {"kind_acc": 0.6},
      "gate": {"background_acc": True, "kind_acc": False, "psnr_db": True}, "gate_passed": False},
     False, "failing: kind_acc"),
    ({"evaluation": GATE_FIGURES, "gate": {"background_acc": True, "kind_acc": True, "psnr_db": True},
      "gate_passed": True}, True, "passed their gate"),
    # A file claiming a pass that its own criteria contradict is not believed.
    ({"gate": {"background_acc": False}, "gate_passed": True}, False, "not passed"),
], ids=["unmeasured", "failing", "passed", "contradicted"])
def test_toy_info_reads_the_recorded_gate(tmp_path, recorded, passed, phrase):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "toyworld.json").write_text(json.dumps({"image_size_px": 64, "vae_step": 5, "unet_step": 7}
                                                     | recorded))
    info = toy.read_toy_info(folder)
    assert info.gate_passed is passed
    note = info.capability_note()
    assert phrase in note and "\n" not in note and "UNet 7 steps" in note


def test_eval_records_the_gate_into_toyworld_json(tmp_path):
    evaluate = load_tool("eval_toy_base")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "toyworld.json").write_text(json.dumps({"image_size_px": 64, "unet_step": 9}))
    report = {"psnr_db": 31.0, "background_acc": 0.95, "kind_acc": 0.5, "pose_corr": float("nan")}
    report["gate"] = {key: report[key] >= bar for key, bar in evaluate.GATE.items() if key in report}
    evaluate.record_gate(folder, report)
    info = toy.read_toy_info(folder)
    assert info.unet_steps == 9 and not info.gate_passed and info.gate["kind_acc"] is False
    assert info.evaluation["pose_corr"] is None  # NaN is written as null
    evaluate.record_gate(folder, {"psnr_db": 31.0, "gate": {"psnr_db": True}})  # a VAE-only evaluation
    assert not toy.read_toy_info(folder).gate_passed


def test_bundled_weights_ship_as_package_data():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "toy/weights/**/*" in data["tool"]["setuptools"]["package-data"]["lowmcgm"]
    folder = REPO / "lowmcgm" / "toy" / "weights"
    if folder.is_dir():
        assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= MAX_BUNDLED_BYTES


def _bench_args(out: Path, model: str, steps: int, sample_steps: int, images: int) -> list[str]:
    return ["--model", model, "--photos", "1", "--subjects", "1", "--targets", "1", "--images", str(images),
            "--steps", str(steps), "--sample-steps", str(sample_steps), "--out", str(out)]


def test_pose_benchmark_writes_table_figure_reuses_records_and_rescores(toy_model_folder, tmp_path, capsys):
    bench = load_tool("bench_pose")
    args = _bench_args(tmp_path, str(toy_model_folder), steps=2, sample_steps=2, images=1)
    summary = bench.main(args)
    assert {"1", "all"} <= set(summary) and summary["1"]["pairs"] == 1
    names = [c.name for c in bench.CONDITIONS]
    assert names[0] == "break_a_scene" and {"mcgm+attention", "mcgm+latent", "break_a_scene+attention", "mcgm_aware",
                                                "mcgm_aware+attention"} <= set(names)
    for condition in names:  # numbers exist; what they are says nothing about random weights
        assert 0.0 <= summary["1"][condition]["iou"] <= 1.0
        assert summary["1"][condition]["seconds_per_image"] > 0
    text = (tmp_path / "results.md").read_text()
    assert "python tools/bench_pose.py --model" in text and "Subjects: 1 (1 photos, 1 pairs" in text
    assert "| MCGM+latent |" in text and "(x" in text  # guided rows give their time against unguided
    assert (tmp_path / "figure.png").stat().st_size > 0 and (tmp_path / "before_after.png").stat().st_size > 0
    record = json.loads((tmp_path / "results.json").read_text())["records"][0]
    photo = tmp_path / "photos" / record["key"]
    assert {r["condition"] for r in record["images"]} == set(names)
    assert record["targets"][0]["background"] != record["background"]  # the prompt asks for a new one
    artifact = photo / "mcgm" / "lowmcgm.safetensors"
    stamp = artifact.stat().st_mtime_ns
    assert "python tools/bench_pose.py" in capsys.readouterr().out
    bench.main(args)  # same settings: the photo's record is reused, nothing is trained again
    assert artifact.stat().st_mtime_ns == stamp
    record_stamp = (photo / "record.json").stat().st_mtime_ns
    bench.main(args + ["--guidance-strength", "5"])  # sampled anew from the same trained artifacts
    assert artifact.stat().st_mtime_ns == stamp and (photo / "record.json").stat().st_mtime_ns != record_stamp
    # --rescore measures the kept images again, and only that: a spoilt figure comes back.
    record = json.loads((photo / "record.json").read_text())
    measured = [row["iou"] for row in record["images"]]
    for row in record["images"]:
        row["iou"] = [-1.0] * len(row["iou"])
    (photo / "record.json").write_text(json.dumps(record))
    bench.main(args + ["--guidance-strength", "5", "--rescore"])
    assert [row["iou"] for row in json.loads((photo / "record.json").read_text())["images"]] == measured
    assert artifact.stat().st_mtime_ns == stamp and "--rescore" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit, match="no record of a run with these settings"):
        bench.main(args + ["--guidance-strength", "7", "--rescore"])  # nothing was sampled so


def test_pose_benchmark_ablates_guidance_settings_and_tables_the_own_pose_apart(toy_model_folder, tmp_path):
    bench = load_tool("bench_pose")
    spec = "latent:step=noise-scaled:strength=30:iterations=2:area_normalized=true"
    args = _bench_args(tmp_path, str(toy_model_folder), steps=1, sample_steps=2, images=1)
    summary = bench.main(args + ["--trainings", "mcgm", "--guidance-modes", f"attention:bias=dense,{spec}",
                                 "--own-pose"])
    names = [c.name for c in bench.CONDITIONS]
    assert names == ["break_a_scene", "mcgm_blank", "mcgm", "break_a_scene+attention:bias=dense",
                     "mcgm+attention:bias=dense", f"break_a_scene+{spec}", f"mcgm+{spec}"]
    guided = bench.CONDITIONS[-1]
    assert guided.guidance == "latent" and dict(guided.options) == {
        "step": "noise-scaled", "strength": 30.0, "iterations": 2, "area_normalized": True}
    assert summary["own"]["pairs"] == 1 and summary["1"]["pairs"] == 1  # the own pose is not among the new ones
    assert summary["own"]["copy_iou"] == 1.0 and summary["1"]["copy_iou"] < 1.0
    record = json.loads((tmp_path / "results.json").read_text())["records"][0]
    assert [t["own"] for t in record["targets"]] == [False, True]
    assert not (tmp_path / "photos" / record["key"] / "mcgm_aware").exists()  # not asked for: not trained
    assert "Subjects: own" in (tmp_path / "results.md").read_text()
    # The guided pass's time, cut and whole, on this run's MCGM artifact: the same images either way.
    timing = load_tool("bench_guidance_time")
    times = timing.main(["--run", str(tmp_path), "--photo", record["key"], "--model", str(toy_model_folder),
                         "--repeats", "1", "--sample-steps", "2", "--images", "1"])
    assert times["same_images"] and set(times["median_seconds"]) == set(timing.CONDITIONS)
    assert all(s > 0 for s in times["median_seconds"].values())
    with pytest.raises(SystemExit, match="record.json is missing"):
        timing.main(["--run", str(tmp_path), "--photo", "s9-p00"])
    for wrong, said in (("latent:strenght=3", "not KEY=VALUE"), ("latent:iterations=two", "not a int"),
                        ("pose:strength=3", "unknown mode")):
        with pytest.raises(SystemExit, match=said):
            bench.parse_guidance_spec(wrong)


def test_photos_are_held_out_and_deterministic():
    bench = load_tool("bench_pose")
    for n in (1, 2, 3):
        photos = bench.make_photos(n, 2, targets=2, size_px=64, seed=0)
        again = bench.make_photos(n, 2, targets=2, size_px=64, seed=0)
        for photo, twin in zip(photos, again):
            assert (photo.image == twin.image).all()
            assert len(set(photo.kinds)) == n
            assert any(c in bench.HELDOUT_COMBOS for c in bench.scene_combos(photo.scene))
            for target in photo.targets:
                assert all(p != s.pose for p, s in zip(target.poses, photo.scene.subjects))
                assert all(m.any() for m in target.masks)


def test_measures_read_a_perfect_image_as_perfect():
    bench = load_tool("bench_pose")
    for n in (1, 2, 3):
        photo = bench.make_photos(n, 1, targets=1, size_px=64, seed=1)[0]
        # The photo itself, judged against its own masks and background: what a perfect model draws.
        itself = bench.Target([s.pose for s in photo.scene.subjects], photo.masks, photo.scene.background)
        figures = bench.measure(photo.image, photo, itself)
        assert figures["background_ok"] and all(figures["drawn"])
        assert min(figures["iou"]) > 0.85 and max(figures["colour_distance"]) < 8
        wrong = bench.measure(photo.image, photo, photo.targets[0])  # new poses, another background
        assert not wrong["background_ok"] and max(wrong["iou"]) < 0.85


GATE_SKIP = ("the bundled toy weights are absent or have not passed their gate (toyworld.json "
             "gate_passed, written by tools/eval_toy_base.py --record): whether they draw the asked "
             "background and kind is only worth asserting after that")


@pytest.mark.skipif(not (toy.load_toy_info() and toy.load_toy_info().gate_passed), reason=GATE_SKIP)
def test_bundled_toy_model_draws_the_asked_background_and_kind(tmp_path):
    bench = load_tool("bench_pose")
    bench.main(_bench_args(tmp_path, "toy", steps=20, sample_steps=20, images=2))
    record = json.loads((tmp_path / "results.json").read_text())["records"][0]
    # Few steps: the handles start from the kind's word, so the base model's knowledge shows.
    # 6 images (2 seeds x 3 conditions), measured as the gate measures (which asks for 90% on 64
    # captions): the background class, and the kind most foreground pixels have.
    rows = record["images"]
    assert sum(r["background_ok"] for r in rows) >= 4, [r["background"] for r in rows]
    assert sum(r["main_kind"] == record["kinds"][0] for r in rows) >= 4, [r["main_kind"] for r in rows]
