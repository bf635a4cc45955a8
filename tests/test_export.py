"""Exports loaded by diffusers' own loaders give lowmcgm's image; kohya names match SD 1.5; import checks.

The "lowmcgm side" is a plain StableDiffusionPipeline over the tiny base into which the artifact is
loaded with lowmcgm's own code (handle rows, ``add_lora``, ``load_lora_state_dict``), no mask tokens.
The "other side" is a fresh pipeline over the same base folder with only diffusers' loaders.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_photo
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from lowmcgm.adapters import add_lora, load_lora_state_dict, lora_state_dict
from lowmcgm.artifact import Artifact, load_artifact, save_artifact
from lowmcgm.config import LoraConfig, resolve_config
from lowmcgm.errors import UserError
from lowmcgm.handles import add_handle_tokens
from lowmcgm.interop.export import build_kohya_metadata, embedding_file_stem, export_artifact, export_kohya
from lowmcgm.interop.lora_import import load_init_lora, read_lora_file, summarize_lora
from lowmcgm.models.folder import save_base_model
from lowmcgm.models.tiny import build_tiny_base
from lowmcgm.training.trainer import train

PROMPT = "a photo of <asset0> and <asset1> on the beach"
ATOL = 1e-4  # fp32 end to end; both sides run PEFT LoRA layers, so differences are rounding only
LORA_B_STD = 0.3  # trained tiny LoRAs barely move (|B| ~ 0.02): scale up so alpha visibly matters


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-base")
    save_base_model(build_tiny_base("tiny"), folder)
    return folder


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """A trained artifact (rank 4, alpha 8, text-encoder LoRA) made strong, and its UNet-only twin."""
    folder = tmp_path_factory.mktemp("export")
    image, a, b = make_photo(folder)
    cfg = resolve_config("tiny-cpu", None, {
        "data.image": image, "data.masks": [a, b], "output.out": str(folder / "run"),
        "train.phase1_steps": 4, "train.phase2_steps": 4, "train.checkpoint_every": 0,
        "lora.use_text_encoder_lora": True, "lora.alpha": 8.0, "lora.rank": 4})
    art = load_artifact(train(cfg))
    assert art.meta["lora"]["alpha"] == 8.0 and art.meta["lora"]["rank"] == 4
    gen = torch.Generator().manual_seed(1)
    for state in (art.unet_lora, art.text_encoder_lora):
        for key in state:
            if ".lora_B." in key:
                state[key] = torch.randn(state[key].shape, generator=gen) * LORA_B_STD
    paths = {"with_te": folder / "with_te.safetensors", "unet_only": folder / "unet_only.safetensors"}
    save_artifact(art, paths["with_te"], dtype="fp32")
    unet_only = dataclasses.replace(art, text_encoder_lora={}, meta=copy.deepcopy(art.meta))
    unet_only.meta["lora"]["text_encoder_targets"] = []
    save_artifact(unet_only, paths["unet_only"], dtype="fp32")
    return paths


def _pipe(base_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe: StableDiffusionPipeline) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def _lowmcgm_image(base_dir: Path, artifact_path: Path) -> np.ndarray:
    """The artifact loaded by lowmcgm's own code: handle rows, add_lora, load_lora_state_dict."""
    art = load_artifact(artifact_path)
    pipe = _pipe(base_dir)
    ids = add_handle_tokens(pipe.tokenizer, pipe.text_encoder, art.handles)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[ids] = art.handle_vectors
    lora = art.meta["lora"]
    add_lora(pipe.unet, tuple(lora["unet_targets"]), lora["rank"], lora["alpha"])
    load_lora_state_dict(pipe.unet, art.unet_lora)
    if art.text_encoder_lora:
        add_lora(pipe.text_encoder, tuple(lora["text_encoder_targets"]), lora["rank"], lora["alpha"])
        load_lora_state_dict(pipe.text_encoder, art.text_encoder_lora)
    return _image(pipe)


@pytest.fixture(scope="module")
def references(base_dir, artifacts) -> dict[str, np.ndarray]:
    refs = {name: _lowmcgm_image(base_dir, path) for name, path in artifacts.items()}
    plain = _image(_pipe(base_dir))
    for name, ref in refs.items():
        assert np.abs(ref - plain).max() > 0.05, f"{name}: the LoRA must visibly change the image"
    return refs


def _load_embeddings_folder(pipe: StableDiffusionPipeline, folder: Path, handles: list[str]) -> None:
    for handle in handles:
        pipe.load_textual_inversion(str(folder / f"{embedding_file_stem(handle)}.safetensors"), token=handle)


VARIANTS = ["with_te", "unet_only"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_kohya_file_in_diffusers_gives_lowmcgms_image(base_dir, artifacts, references, tmp_path, variant):
    lora = export_artifact(artifacts[variant], "kohya", tmp_path / "lora.safetensors", bundle_embeddings=False,
                           dtype="fp32").files[0]
    embeddings = export_artifact(artifacts[variant], "embeddings", tmp_path / "emb")
    pipe = _pipe(base_dir)
    pipe.load_lora_weights(str(lora))
    _load_embeddings_folder(pipe, tmp_path / "emb", embeddings.handles)
    np.testing.assert_allclose(_image(pipe), references[variant], atol=ATOL)


def test_bundled_kohya_file_carries_the_handles(base_dir, artifacts, references, tmp_path):
    path = export_artifact(artifacts["with_te"], "kohya", tmp_path / "lora.safetensors", dtype="fp32").files[0]
    state = load_file(str(path))
    # diffusers' load_lora_weights refuses non-LoRA keys, so split the bundle off as a user would.
    bundled = {k: v for k, v in state.items() if k.startswith("bundle_emb.")}
    assert sorted(bundled) == ["bundle_emb.<asset0>.string_to_param.*", "bundle_emb.<asset1>.string_to_param.*"]
    pipe = _pipe(base_dir)
    pipe.load_lora_weights({k: v for k, v in state.items() if k not in bundled})
    for key, vector in bundled.items():
        pipe.load_textual_inversion({"string_to_param": {"*": vector}, "name": key.split(".")[1]})
    np.testing.assert_allclose(_image(pipe), references["with_te"], atol=ATOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_folder_gives_lowmcgms_image(base_dir, artifacts, references, tmp_path, variant):
    files = export_artifact(artifacts[variant], "diffusers", tmp_path / "out", dtype="fp32").files
    assert sorted(p.name for p in files) == ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]
    pipe = _pipe(base_dir)
    pipe.load_lora_weights(str(tmp_path / "out"))
    embeds = load_file(str(tmp_path / "out" / "learned_embeds.safetensors"))
    pipe.load_textual_inversion([{token: vector} for token, vector in embeds.items()])
    np.testing.assert_allclose(_image(pipe), references[variant], atol=ATOL)


def test_wrong_alpha_would_show(base_dir, artifacts, references, tmp_path):
    """The tests above could fail: alpha = rank (diffusers' converter's value) changes the image."""
    path = export_artifact(artifacts["with_te"], "kohya", tmp_path / "lora.safetensors", bundle_embeddings=False,
                           dtype="fp32").files[0]
    state = load_file(str(path))
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {8.0}
    wrong = {k: torch.tensor(4.0) if k.endswith(".alpha") else v for k, v in state.items()}
    embeds = export_artifact(artifacts["with_te"], "embeddings", tmp_path / "emb")
    pipe = _pipe(base_dir)
    pipe.load_lora_weights(wrong)
    _load_embeddings_folder(pipe, tmp_path / "emb", embeds.handles)
    assert np.abs(_image(pipe) - references["with_te"]).max() > 100 * ATOL


def test_diffusers_metadata_holds_alpha(artifacts, tmp_path):
    export_artifact(artifacts["with_te"], "diffusers", tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
        keys = list(fh.keys())
        dtypes = {fh.get_tensor(k).dtype for k in keys}
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8.0
    assert meta["text_encoder.r"] == 4 and meta["text_encoder.lora_alpha"] == 8.0
    assert dtypes == {torch.float16}  # the default export precision
    # text_model. kept in keys: diffusers strips it for transformers without the wrapper.
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.") for k in keys)


def test_embedding_files_use_the_a1111_layout(artifacts, tmp_path):
    result = export_artifact(artifacts["with_te"], "embeddings", tmp_path / "emb")
    art = load_artifact(artifacts["with_te"])
    assert [p.name for p in result.files] == ["asset0.safetensors", "asset1.safetensors"]
    for path, vector in zip(result.files, art.handle_vectors):
        state = load_file(str(path))
        assert list(state) == ["string_to_param.*"] and state["string_to_param.*"].shape == (1, art.text_width)
        torch.testing.assert_close(state["string_to_param.*"][0], vector)


# ------------------------------------------------------------------------------------------------
# kohya names against the real SD 1.5 layout (built on the meta device: no weights, no download)
# ------------------------------------------------------------------------------------------------

def _sd15_models() -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """SD 1.5's UNet and text encoder from their shipped real configs."""
    from lowmcgm.models.configs import config_folder

    folder = config_folder("sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    return unet, text_encoder


def _kohya_default_unet_names(unet: UNet2DConditionModel) -> set[str]:
    """kohya's rule, written independently of lowmcgm: every Linear and 1x1 Conv2d inside a
    Transformer2DModel, named ``lora_unet_`` + the diffusers path with dots as underscores."""
    names = set()
    for path, module in unet.named_modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        for sub, child in module.named_modules():
            if isinstance(child, torch.nn.Linear) or (isinstance(child, torch.nn.Conv2d)
                                                     and child.kernel_size == (1, 1)):
                names.add("lora_unet_" + f"{path}.{sub}".replace(".", "_"))
    return names


# The text-encoder modules ComfyUI's SD1 key map lists, per layer (its LORA_CLIP_MAP).
CLIP_LAYER_MODULES = ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj",
                      "self_attn_out_proj")
# A1111's convert_diffusers_name_to_compvis patterns for SD 1.x LoRA keys (extensions-builtin/Lora).
A1111_PATTERNS = (
    r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
    r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
    r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
    r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
)


def test_kohya_names_match_sd15_under_a1111_and_comfyui_naming(tmp_path):
    unet, text_encoder = _sd15_models()
    expected_unet = _kohya_default_unet_names(unet)  # before PEFT wraps the modules
    defaults = LoraConfig()
    add_lora(unet, defaults.unet_targets, 4, 8.0)
    add_lora(text_encoder, defaults.text_encoder_targets, 4, 8.0)

    def real(state):  # meta tensors -> small real ones of the same shapes
        return {k: torch.full(v.shape, 0.01) for k, v in state.items()}

    art = Artifact(handles=["<asset0>"], handle_vector_sets=[torch.zeros(1, 768)], mask_encoder={},
                   unet_lora=real(lora_state_dict(unet)), text_encoder_lora=real(lora_state_dict(text_encoder)),
                   meta={"base_model_version": "sd_v1", "resolution": 512, "prediction_type": "epsilon",
                         "base_model": "sd15", "lora": {"mode": "lora", "rank": 4, "alpha": 8.0}})
    path = export_kohya(art, tmp_path / "sd15.safetensors", dtype="fp16")
    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
        meta = fh.metadata()
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in keys}

    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
               for k in keys if not k.startswith("bundle_emb.")}
    unet_names = {m for m in modules if m.startswith("lora_unet_")}
    te_names = modules - unet_names
    assert unet_names == expected_unet and len(unet_names) == 192
    assert te_names == {f"lora_te_text_model_encoder_layers_{i}_{m}" for i in range(12) for m in CLIP_LAYER_MODULES}
    assert len(te_names) == 72
    for name in modules:
        assert any(re.fullmatch(p, name) for p in A1111_PATTERNS), name
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
        assert shapes[f"{name}.alpha"] == ()
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert shapes[f"{proj_in}.lora_down.weight"] == (4, 320, 1, 1)
    assert shapes[f"{proj_in}.lora_up.weight"] == (320, 4, 1, 1)
    assert shapes["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] == (3072, 4)
    assert keys - {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")} == \
        {"bundle_emb.<asset0>.string_to_param.*"}
    assert shapes["bundle_emb.<asset0>.string_to_param.*"] == (1, 768)
    expected = {
        "ss_v2": "False", "ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora",
        "ss_network_dim": "4", "ss_network_alpha": "8.0", "ss_network_args": "{}", "ss_output_name": "sd15",
        "ss_resolution": "(512, 512)", "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.implementation": "diffusers",
        "modelspec.title": "sd15", "modelspec.resolution": "512x512", "modelspec.trigger_phrase": "<asset0>",
        "modelspec.prediction_type": "epsilon",
    }
    assert {k: meta.get(k) for k in expected} == expected


@pytest.mark.parametrize("version,v2,architecture,prediction", [
    ("sd_v1", "False", "stable-diffusion-v1/lora", "epsilon"),
    ("sd_v2", "True", "stable-diffusion-v2-512/lora", "epsilon"),
    ("sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "v"),
], ids=["sd1", "sd2", "sd2-v"])
def test_kohya_metadata_per_base_version(version, v2, architecture, prediction):
    art = Artifact(["<a>"], [torch.zeros(1, 8)], {}, {"x.lora_A.weight": torch.zeros(4, 8)}, {},
                   meta={"base_model_version": version, "resolution": "768", "lora": {"mode": "lora", "rank": 4,
                                                                                      "alpha": 2}})
    meta = build_kohya_metadata(art, "x")
    assert (meta["ss_v2"], meta["modelspec.architecture"], meta["modelspec.prediction_type"]) == \
        (v2, architecture, prediction)
    assert meta["ss_base_model_version"] == version and meta["modelspec.resolution"] == "768x768"
    assert meta["ss_network_alpha"] == "2.0"


# ------------------------------------------------------------------------------------------------
# Import: summary, and load_init_lora into the trainer's injected LoRA
# ------------------------------------------------------------------------------------------------

def _setup(base_name="tiny", rank=4, alpha=8.0, use_te=True, **targets) -> SimpleNamespace:
    """What load_init_lora reads of the trainer's Setup, prepared like add_phase2_adapters does."""
    cfg = dataclasses.replace(LoraConfig(), rank=rank, alpha=alpha, use_text_encoder_lora=use_te, **targets)
    base = build_tiny_base(base_name)
    add_lora(base.unet, cfg.unet_targets, cfg.rank, cfg.alpha)
    if use_te:
        add_lora(base.text_encoder, cfg.text_encoder_targets, cfg.rank, cfg.alpha)
    return SimpleNamespace(cfg=SimpleNamespace(lora=cfg), base=base)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "artifact"])
def test_round_trip_export_then_load_init_lora(artifacts, tmp_path, fmt):
    art = load_artifact(artifacts["with_te"])
    if fmt == "artifact":  # a later run may start from an earlier run's artifact directly
        path = artifacts["with_te"]
    else:
        out = tmp_path / ("lora.safetensors" if fmt == "kohya" else "diffusers")
        path = export_artifact(artifacts["with_te"], fmt, out, dtype="fp32").files[0]
    setup = _setup()
    load_init_lora(setup, path)
    for model, expected in ((setup.base.unet, art.unet_lora), (setup.base.text_encoder, art.text_encoder_lora)):
        got = lora_state_dict(model)
        assert sorted(got) == sorted(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_load_init_lora_accepts_diffusers_converter_te_names(artifacts, tmp_path):
    """Files from diffusers' convert_state_dict_to_kohya name the text encoder lora_te1_encoder_layers_*."""
    path = export_artifact(artifacts["with_te"], "kohya", tmp_path / "a.safetensors", dtype="fp32").files[0]
    state = {k.replace("lora_te_text_model_", "lora_te1_"): v for k, v in load_file(str(path)).items()}
    save_file(state, str(tmp_path / "te1.safetensors"))
    setup = _setup()
    load_init_lora(setup, tmp_path / "te1.safetensors")
    art = load_artifact(artifacts["with_te"])
    key = "encoder.layers.1.self_attn.q_proj.lora_B.weight"
    torch.testing.assert_close(lora_state_dict(setup.base.text_encoder)[key], art.text_encoder_lora[key])


@pytest.mark.parametrize("setup_kwargs,fragment", [
    ({"rank": 8}, "--set lora.rank=4"),
    ({"alpha": 4.0}, "--set lora.alpha=8"),
    ({"use_te": False}, "--set lora.use_text_encoder_lora=true"),
    ({"unet_targets": ("to_q", "to_k", "to_v", "to_out.0")}, "--set lora.unet_targets=...,proj_in"),
    ({"base_name": "tiny-v"}, "another"),
], ids=["rank", "alpha", "text-encoder", "targets", "other-base"])
def test_load_init_lora_refuses_mismatches_naming_the_setting(artifacts, tmp_path, setup_kwargs, fragment):
    path = export_artifact(artifacts["with_te"], "kohya", tmp_path / "a.safetensors").files[0]
    with pytest.raises(UserError, match=re.escape(fragment)):
        load_init_lora(_setup(**setup_kwargs), path)


def test_summary_of_kohya_and_diffusers_files(artifacts, tmp_path):
    kohya = summarize_lora(export_artifact(artifacts["with_te"], "kohya", tmp_path / "k.safetensors").files[0])
    assert (kohya.format, kohya.ranks, kohya.alphas, kohya.alpha_stored) == ("kohya", [4], [8.0], True)
    assert (kohya.unet_modules, kohya.text_encoder_modules) == (120, 12)
    assert kohya.embeddings == ["<asset0>", "<asset1>"] and kohya.base.startswith("sd_v1")
    assert kohya.settings[1:] == ["lora.rank=4", "lora.alpha=8", "lora.use_text_encoder_lora=true"]
    diff = summarize_lora(export_artifact(artifacts["unet_only"], "diffusers", tmp_path / "d").files[0].parent)
    assert (diff.format, diff.ranks, diff.alphas, diff.text_encoder_modules) == ("diffusers", [4], [8.0], 0)
    assert "lora.use_text_encoder_lora=true" not in diff.settings


def test_diffusers_file_without_metadata_assumes_alpha_equals_rank(artifacts, tmp_path):
    path = export_artifact(artifacts["unet_only"], "diffusers", tmp_path / "d").files[0]
    save_file(load_file(str(path)), str(tmp_path / "bare.safetensors"))
    summary = summarize_lora(tmp_path / "bare.safetensors")
    assert summary.alphas == [4.0] and summary.alpha_stored is False


@pytest.mark.parametrize("tensors,fragment", [
    ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, "not a plain LoRA"),
    ({"lora_te2_x.lora_down.weight": torch.zeros(2, 2)}, "SDXL"),
    ({"model.weight": torch.zeros(2, 2)}, "neither a kohya LoRA"),
    ({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, "lacks its lora_down or lora_up"),
    ({"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 2)},
     "do not fit together"),
], ids=["lycoris", "sdxl", "unknown", "incomplete", "shapes"])
def test_read_lora_file_refuses_other_files(tmp_path, tensors, fragment):
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match=re.escape(fragment)):
        read_lora_file(tmp_path / "x.safetensors")


def test_read_lora_file_never_unpickles(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not even a pickle")
    with pytest.raises(UserError, match="never unpickles"):
        read_lora_file(tmp_path / "x.pt")


# ------------------------------------------------------------------------------------------------
# Refusals on the export side
# ------------------------------------------------------------------------------------------------

def test_full_mode_and_lora_less_artifacts_have_nothing_to_export(artifacts, tmp_path):
    art = load_artifact(artifacts["unet_only"])
    full = dataclasses.replace(art, meta=copy.deepcopy(art.meta))
    full.meta["lora"]["mode"] = "full"
    save_artifact(full, tmp_path / "full.safetensors")
    for fmt in ("kohya", "diffusers"):
        with pytest.raises(UserError, match="phase2_mode=full"):
            export_artifact(tmp_path / "full.safetensors", fmt, tmp_path / f"o-{fmt}.safetensors")
    assert len(export_artifact(tmp_path / "full.safetensors", "embeddings", tmp_path / "emb").files) == 2
    save_artifact(dataclasses.replace(art, unet_lora={}), tmp_path / "nolora.safetensors")
    with pytest.raises(UserError, match="phase2_steps=0"):
        export_artifact(tmp_path / "nolora.safetensors", "kohya", tmp_path / "o.safetensors")


def test_bad_output_paths(artifacts, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dir.safetensors").mkdir()
    cases = [("kohya", tmp_path / "lora.pt", "must name a .safetensors file"),
             ("kohya", tmp_path / "dir.safetensors", "is a folder"),
             ("embeddings", tmp_path / "file.txt", "is not a folder"),
             ("diffusers", tmp_path / "file.txt", "is not a folder"),
             ("onnx", tmp_path / "x", "Unknown export format")]
    for fmt, out, fragment in cases:
        with pytest.raises(UserError, match=re.escape(fragment)):
            export_artifact(artifacts["with_te"], fmt, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.safetensors", "file.txt"]  # nothing half-written


@pytest.mark.parametrize("variant", ["with_te", "unet_only"])
def test_lowmcgm_sample_no_mask_equals_diffusers_with_the_kohya_export(base_dir, artifacts, tmp_path, variant):
    """The issue's check end to end: `lowmcgm sample --no-mask` vs diffusers' own loaders."""
    from PIL import Image

    from lowmcgm.cli import main

    out = tmp_path / "samples"
    code = main(["sample", "--artifact", str(artifacts[variant]), "--base-model", str(base_dir), "--prompt", PROMPT,
                 "--no-mask", "--steps", "3", "--guidance-scale", "5", "--scheduler", "ddim", "--num-images", "1",
                 "--seed", "0", "--height", "64", "--width", "64", "--dtype", "fp32", "--out", str(out)])
    assert code == 0
    ours = np.asarray(Image.open(next(p for p in out.glob("*.png") if p.name != "grid.png")), dtype=np.int16)
    lora = export_artifact(artifacts[variant], "kohya", tmp_path / "lora.safetensors", bundle_embeddings=False,
                           dtype="fp32").files[0]
    embeddings = export_artifact(artifacts[variant], "embeddings", tmp_path / "emb")
    pipe = _pipe(base_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora))
    _load_embeddings_folder(pipe, tmp_path / "emb", embeddings.handles)
    theirs = pipe(PROMPT, num_inference_steps=3, height=64, width=64, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1  # uint8 rounding only
