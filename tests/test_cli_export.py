"""The real `lowmcgm export` and `lowmcgm import-lora` entry points on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_photo, make_sdxl_artifact
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowmcgm.artifact import load_artifact, save_artifact
from lowmcgm.cli import main

MASK_LINE = "mask encoder"


def _train_args(folder: Path, out: Path, *extra: str) -> list[str]:
    image, a, b = make_photo(folder)
    return ["train", "--preset", "tiny-cpu", "--base-model", "tiny", "--image", image, "--mask", a, "--mask", b,
            "--out", str(out), "--set", "train.phase1_steps=3", "--set", "train.phase2_steps=3",
            "--set", "train.checkpoint_every=0", "--set", "lora.use_text_encoder_lora=true",
            "--set", "lora.alpha=8", *extra]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-export")
    assert main(_train_args(folder, folder / "run")) == 0
    return folder / "run" / "lowmcgm.safetensors"


@pytest.mark.parametrize("fmt,out,files", [
    ("kohya", "dogcat.safetensors", ["dogcat.safetensors"]),
    ("embeddings", "emb", ["emb/asset0.safetensors", "emb/asset1.safetensors"]),
    ("diffusers", "diff", ["diff/learned_embeds.safetensors", "diff/pytorch_lora_weights.safetensors"]),
], ids=["kohya", "embeddings", "diffusers"])
def test_export_writes_files_and_says_once_what_is_lost(artifact, tmp_path, capsys, fmt, out, files):
    assert main(["export", str(artifact), "--format", fmt, "--out", str(tmp_path / out)]) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == files  # no temporary files left behind
    lines = capsys.readouterr().out.splitlines()
    assert sum(MASK_LINE in line for line in lines) == 1
    assert all(f"Wrote {tmp_path / f}" in lines for f in files)


def test_kohya_export_defaults_to_fp16_with_bundled_handles(artifact, tmp_path):
    assert main(["export", str(artifact), "--format", "kohya", "--out", str(tmp_path / "a.safetensors")]) == 0
    assert main(["export", str(artifact), "--format", "kohya", "--out", str(tmp_path / "b.safetensors"),
                 "--no-bundle-embeddings", "--dtype", "fp32"]) == 0
    bundled, plain = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert {v.dtype for k, v in bundled.items() if k.endswith("lora_down.weight")} == {torch.float16}
    assert {v.dtype for k, v in plain.items() if k.endswith("lora_down.weight")} == {torch.float32}
    assert {k for k in bundled if k.startswith("bundle_emb.")} == {"bundle_emb.<asset0>.string_to_param.*",
                                                                   "bundle_emb.<asset1>.string_to_param.*"}
    assert not any(k.startswith("bundle_emb.") for k in plain)
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_alpha"] == "8.0" and meta["ss_network_dim"] == "4"
    assert meta["modelspec.trigger_phrase"] == "<asset0>, <asset1>" and meta["ss_output_name"] == "a"


def test_import_lora_prints_the_settings_to_train_from_it(artifact, tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"
    assert main(["export", str(artifact), "--format", "kohya", "--out", str(lora)]) == 0
    capsys.readouterr()
    assert main(["import-lora", str(lora)]) == 0
    out = capsys.readouterr().out
    assert "kohya LoRA" in out and "rank 4, alpha 8" in out and "sd_v1" in out
    assert (f"--set lora.init_lora={lora} --set lora.rank=4 --set lora.alpha=8 "
            "--set lora.use_text_encoder_lora=true") in out
    assert main(["import-lora", str(lora), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "kohya" and data["unet_modules"] == 120 and data["text_encoder_modules"] == 12
    assert main(["import-lora", str(artifact)]) == 0  # an earlier run's artifact works as well
    assert "lowmcgm LoRA" in capsys.readouterr().out


def test_train_starts_phase_2_from_an_exported_lora(artifact, tmp_path):
    lora = tmp_path / "lora.safetensors"
    assert main(["export", str(artifact), "--format", "kohya", "--out", str(lora), "--dtype", "fp32"]) == 0
    with safe_open(str(lora), "pt") as fh:
        meta = fh.metadata()
    # Three training steps barely move the up weights from zero: make them large enough to tell
    # "started from the file" from "started from zero".
    state = {k: v * 20 if k.endswith("lora_up.weight") else v for k, v in load_file(str(lora)).items()}
    save_file(state, str(lora), metadata=meta)
    out = tmp_path / "run2"
    # One phase-2 step at lr 1e-3 moves a weight by about 1e-3: the result must sit at the file's LoRA.
    args = _train_args(tmp_path, out, "--set", f"lora.init_lora={lora}", "--set", "train.phase2_steps=1")
    assert main(args) == 0
    after = load_artifact(out / "lowmcgm.safetensors").unet_lora
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    start = state[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"]
    assert start.abs().max() > 0.02
    torch.testing.assert_close(after[f"{name}.lora_B.weight"], start, rtol=0, atol=3e-3)


def test_train_refuses_an_init_lora_of_another_rank(artifact, tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"
    assert main(["export", str(artifact), "--format", "kohya", "--out", str(lora)]) == 0
    args = _train_args(tmp_path, tmp_path / "run3", "--set", f"lora.init_lora={lora}", "--set", "lora.rank=8")
    assert main(args) == 2
    assert "--set lora.rank=4" in capsys.readouterr().err


def test_user_errors_exit_2(artifact, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    save_file({"string_to_param.*": torch.zeros(1, 32)}, str(tmp_path / "emb.safetensors"))
    cases = [
        (["export", str(tmp_path / "missing.safetensors"), "--format", "kohya", "--out", str(tmp_path / "o.safetensors")],
         "File not found"),
        (["export", str(artifact), "--format", "onnx", "--out", str(tmp_path / "o")], "Unknown export format 'onnx'"),
        (["export", str(artifact), "--format", "kohya", "--out", str(tmp_path / "o.pt")], "must name a .safetensors"),
        (["export", str(artifact), "--format", "kohya", "--out", str(tmp_path / "o.safetensors"), "--dtype", "int8"],
         "Unknown export dtype"),
        (["export", str(artifact), "--format", "diffusers", "--out", str(tmp_path / "notes.txt")], "not a folder"),
        (["import-lora", str(tmp_path / "emb.safetensors")], "textual-inversion embedding, not a LoRA"),
        (["import-lora", str(tmp_path / "notes.txt")], "never unpickles"),
        (["import-lora", str(tmp_path / "o.safetensors")], "File not found"),
    ]
    for args, fragment in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, (args, err)


# ------------------------------------------------------------------------------------------------
# SDXL artifacts (made without training: tests/conftest.py); what they compute is test_export_sdxl.py's
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_artifact(tmp_path_factory) -> Path:
    return make_sdxl_artifact(tmp_path_factory.mktemp("cli-export-xl") / "xl.safetensors")


# The diffusers hint names the second encoder: SDXL's rows are loaded once per text encoder.
@pytest.mark.parametrize("fmt,out,files,hint", [
    ("kohya", "xl_lora.safetensors", ["xl_lora.safetensors"], "A1111 loads the bundled handles"),
    ("embeddings", "emb", ["emb/asset0.safetensors", "emb/asset1.safetensors"], "text_encoder=pipe.text_encoder_2"),
    ("diffusers", "diff", ["diff/learned_embeds.safetensors", "diff/pytorch_lora_weights.safetensors"],
     "token=[<asset0>, <asset1>]"),
], ids=["kohya", "embeddings", "diffusers"])
def test_export_of_an_sdxl_artifact(sdxl_artifact, tmp_path, capsys, fmt, out, files, hint):
    assert main(["export", str(sdxl_artifact), "--format", fmt, "--out", str(tmp_path / out)]) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == files
    printed = capsys.readouterr().out
    assert hint in printed and sum(MASK_LINE in line for line in printed.splitlines()) == 1
    if fmt == "kohya":
        with safe_open(str(tmp_path / out), "pt") as fh:
            meta, keys = fh.metadata(), set(fh.keys())
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert {"bundle_emb.<asset0>.clip_l", "bundle_emb.<asset0>.clip_g"} <= keys
        assert any(k.startswith("lora_unet_output_blocks_") for k in keys)


def test_export_of_an_sdxl_unet_of_unknown_layout_exits_2(sdxl_artifact, tmp_path, capsys):
    art = load_artifact(sdxl_artifact)
    art.meta["base_model"] = "my-sdxl-folder"  # tiny-xl's UNet under a name lowmcgm cannot resolve
    save_artifact(art, tmp_path / "renamed.safetensors", dtype="fp32")
    assert main(["export", str(tmp_path / "renamed.safetensors"), "--format", "kohya",
                 "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "not laid out as SDXL base's UNet" in err and "--format diffusers" in err and "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()
