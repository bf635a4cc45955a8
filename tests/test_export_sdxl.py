"""SDXL exports loaded by diffusers' own SDXL loaders compute what lowmcgm's installed state computes.

"lowmcgm's side" is a StableDiffusionXLPipeline over the saved tiny-xl folder whose components carry
the artifact installed by ``MCGMState.from_artifact`` (handle rows in both encoders, PEFT LoRA). "The
other side" is a fresh pipeline over the same folder with only diffusers' loaders
(``load_lora_weights``, ``load_textual_inversion`` once per text encoder). Both see the same UNet
inputs, prompt and seed; the artifacts (tests/conftest.py) have both encoders' handle rows moved
differently and non-zero LoRA up weights, so a swapped, lost or rescaled part shows.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SDXL_HANDLES, make_sdxl_artifact, pooled_written_out
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from lowmcgm.adapters import add_lora, lora_state_dict
from lowmcgm.artifact import Artifact, load_artifact, save_artifact
from lowmcgm.config import LoraConfig
from lowmcgm.errors import UserError
from lowmcgm.interop.export import embedding_file_stem, export_artifact, export_kohya
from lowmcgm.mcgm import MCGMState
from lowmcgm.models.base import BaseModel
from lowmcgm.models.configs import config_folder
from lowmcgm.models.folder import save_base_model
from lowmcgm.models.sdxl_conditioning import sdxl_time_ids
from lowmcgm.models.text_conditioning import encode_sdxl_text
from lowmcgm.models.tiny import build_tiny_base

PROMPT = "a photo of <asset0> and <asset1> on the beach"
ATOL = 1e-5  # fp32 end to end, PEFT LoRA layers on both sides: rounding only
IMAGE_ATOL = 1e-4  # the same through two denoising steps and the VAE
SIZE_PX = 64
VARIANTS = ["unet_only", "with_te"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-xl")
    save_base_model(build_tiny_base("tiny-xl"), folder)
    return folder


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """UNet LoRA only (what SDXL training writes), and with a LoRA on the first text encoder too."""
    folder = tmp_path_factory.mktemp("xl-artifacts")
    return {"unet_only": make_sdxl_artifact(folder / "unet_only.safetensors"),
            "with_te": make_sdxl_artifact(folder / "with_te.safetensors", use_text_encoder_lora=True)}


def _pipe(base_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _base_of(pipe: StableDiffusionXLPipeline) -> BaseModel:
    """The pipeline's own components as lowmcgm's base: what lowmcgm installs, the pipeline runs."""
    return BaseModel(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler, name="tiny-xl",
                     tokenizer_2=pipe.tokenizer_2, text_encoder_2=pipe.text_encoder_2)


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def _unet_inputs(base: BaseModel) -> dict[str, torch.Tensor]:
    """Latents, timestep and SDXL conditioning, as lowmcgm builds them from its installed state."""
    text = encode_sdxl_text(base, _ids(base.tokenizer), _ids(base.tokenizer_2))
    latents = torch.randn((1, 4, SIZE_PX // 2, SIZE_PX // 2), generator=torch.Generator().manual_seed(0))
    time_ids = sdxl_time_ids(base, (SIZE_PX, SIZE_PX), (0, 0), (SIZE_PX, SIZE_PX))
    return {"latents": latents, "context": text.context, "pooled": text.pooled, "time_ids": time_ids}


@torch.no_grad()
def _unet_output(pipe: StableDiffusionXLPipeline, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return pipe.unet(inputs["latents"], 500, encoder_hidden_states=inputs["context"],
                     added_cond_kwargs={"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}).sample


@torch.no_grad()
def _prompt_embeds(pipe: StableDiffusionXLPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """The context as diffusers' ``encode_prompt`` builds it, and the pooled embedding as ComfyUI and
    A1111 take it (at the first end-of-text token), written out here: diffusers' pipeline pools at the
    highest token id, which is the handle's once the exported embeddings are loaded."""
    context, _, _, _ = pipe.encode_prompt(PROMPT, device=torch.device("cpu"), num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    pooled = pooled_written_out(pipe.tokenizer_2, pipe.text_encoder_2, [PROMPT])
    return context, pooled


def _image(pipe: StableDiffusionXLPipeline) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=2, height=SIZE_PX, width=SIZE_PX, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def references(base_dir, artifacts) -> dict[str, dict]:
    """lowmcgm's side per variant: its UNet inputs, UNet output, text conditioning and image."""
    plain = _pipe(base_dir)
    plain_image = _image(plain)
    refs = {}
    for name, path in artifacts.items():
        pipe = _pipe(base_dir)
        base = _base_of(pipe)
        MCGMState.from_artifact(base, load_artifact(path))
        inputs = _unet_inputs(base)
        refs[name] = {"inputs": inputs, "unet": _unet_output(pipe, inputs), "image": _image(pipe),
                      "context": inputs["context"], "pooled": inputs["pooled"]}
        # Non-vacuous: the LoRA changes the UNet, the handles the text, and both the image.
        assert (refs[name]["unet"] - _unet_output(plain, inputs)).abs().max() > 0.05, name
        assert (inputs["context"] - _prompt_embeds(plain)[0]).abs().max() > 0.05, name
        assert np.abs(refs[name]["image"] - plain_image).max() > 100 * IMAGE_ATOL, name
    return refs


def _load_embedding_rows(pipe: StableDiffusionXLPipeline, clip_l: torch.Tensor, clip_g: torch.Tensor,
                         tokens: str | list[str]) -> None:
    """diffusers' documented way for SDXL embeddings: each encoder's rows into that encoder."""
    pipe.load_textual_inversion(clip_l, token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token=tokens, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)


def _load_embeddings_folder(pipe: StableDiffusionXLPipeline, folder: Path) -> None:
    for handle in SDXL_HANDLES:
        state = load_file(str(folder / f"{embedding_file_stem(handle)}.safetensors"))
        _load_embedding_rows(pipe, state["clip_l"], state["clip_g"], handle)


def _assert_computes_like(pipe: StableDiffusionXLPipeline, ref: dict, image: bool = True) -> None:
    torch.testing.assert_close(_unet_output(pipe, ref["inputs"]), ref["unet"], rtol=0, atol=ATOL)
    context, pooled = _prompt_embeds(pipe)
    torch.testing.assert_close(context, ref["context"], rtol=0, atol=ATOL)
    torch.testing.assert_close(pooled, ref["pooled"], rtol=0, atol=ATOL)
    if image:
        np.testing.assert_allclose(_image(pipe), ref["image"], rtol=0, atol=IMAGE_ATOL)


# ------------------------------------------------------------------------------------------------
# Each format, through diffusers' SDXL loaders
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_kohya_file_and_embeddings_in_diffusers_compute_lowmcgms(base_dir, artifacts, references, tmp_path, variant):
    lora = export_artifact(artifacts[variant], "kohya", tmp_path / "lora.safetensors", bundle_embeddings=False,
                           dtype="fp32").files[0]
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(str(lora)))  # SGM names, not diffusers'
    export_artifact(artifacts[variant], "embeddings", tmp_path / "emb")
    pipe = _pipe(base_dir)
    pipe.load_lora_weights(str(lora))
    _load_embeddings_folder(pipe, tmp_path / "emb")
    _assert_computes_like(pipe, references[variant])


def test_bundled_kohya_file_carries_both_encoders_rows(base_dir, artifacts, references, tmp_path):
    path = export_artifact(artifacts["with_te"], "kohya", tmp_path / "lora.safetensors", dtype="fp32").files[0]
    state = load_file(str(path))
    bundled = {k: v for k, v in state.items() if k.startswith("bundle_emb.")}
    assert sorted(bundled) == [f"bundle_emb.{h}.{key}" for h in SDXL_HANDLES for key in ("clip_g", "clip_l")]
    # diffusers' load_lora_weights refuses non-LoRA keys, so split the bundle off as a user would.
    pipe = _pipe(base_dir)
    pipe.load_lora_weights({k: v for k, v in state.items() if k not in bundled})
    for handle in SDXL_HANDLES:
        _load_embedding_rows(pipe, bundled[f"bundle_emb.{handle}.clip_l"], bundled[f"bundle_emb.{handle}.clip_g"],
                             handle)
    _assert_computes_like(pipe, references["with_te"], image=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_folder_computes_lowmcgms(base_dir, artifacts, references, tmp_path, variant):
    files = export_artifact(artifacts[variant], "diffusers", tmp_path / "out", dtype="fp32").files
    assert sorted(p.name for p in files) == ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]
    pipe = _pipe(base_dir)
    pipe.load_lora_weights(str(tmp_path / "out"))
    embeds = load_file(str(tmp_path / "out" / "learned_embeds.safetensors"))
    assert sorted(embeds) == ["clip_g", "clip_l"]
    _load_embedding_rows(pipe, embeds["clip_l"], embeds["clip_g"], SDXL_HANDLES)
    _assert_computes_like(pipe, references[variant])


# ------------------------------------------------------------------------------------------------
# The checks above can fail
# ------------------------------------------------------------------------------------------------

def test_wrong_alpha_would_show(base_dir, artifacts, references, tmp_path):
    """alpha = rank (diffusers' converter's value) changes the UNet's output."""
    path = export_artifact(artifacts["unet_only"], "kohya", tmp_path / "lora.safetensors", bundle_embeddings=False,
                           dtype="fp32").files[0]
    state = load_file(str(path))
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {8.0}
    pipe = _pipe(base_dir)
    pipe.load_lora_weights({k: torch.tensor(4.0) if k.endswith(".alpha") else v for k, v in state.items()})
    ref = references["unet_only"]
    assert (_unet_output(pipe, ref["inputs"]) - ref["unet"]).abs().max() > 100 * ATOL


def test_rows_in_the_wrong_encoder_would_show(base_dir, artifacts, references, tmp_path):
    """tiny-xl's encoders are equally wide, so swapped rows load silently: only the output tells."""
    export_artifact(artifacts["unet_only"], "diffusers", tmp_path / "out", dtype="fp32")
    embeds = load_file(str(tmp_path / "out" / "learned_embeds.safetensors"))
    pipe = _pipe(base_dir)
    _load_embedding_rows(pipe, embeds["clip_g"], embeds["clip_l"], SDXL_HANDLES)
    assert (_prompt_embeds(pipe)[0] - references["unet_only"]["context"]).abs().max() > 100 * ATOL


# ------------------------------------------------------------------------------------------------
# Layouts and metadata
# ------------------------------------------------------------------------------------------------

def test_embedding_files_hold_one_row_per_encoder(artifacts, tmp_path):
    result = export_artifact(artifacts["unet_only"], "embeddings", tmp_path / "emb")
    art = load_artifact(artifacts["unet_only"])
    assert [p.name for p in result.files] == ["asset0.safetensors", "asset1.safetensors"] and result.sdxl
    for index, path in enumerate(result.files):
        state = load_file(str(path))
        assert sorted(state) == ["clip_g", "clip_l"]  # nothing else: A1111 reads every tensor in the file
        torch.testing.assert_close(state["clip_l"], art.handle_vectors[index][None], rtol=0, atol=0)
        torch.testing.assert_close(state["clip_g"], art.handle_vector_sets[1][index][None], rtol=0, atol=0)


def test_diffusers_metadata_holds_alpha_and_the_handle_order(artifacts, tmp_path):
    export_artifact(artifacts["with_te"], "diffusers", tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (4, 8.0)
    assert (meta["text_encoder.r"], meta["text_encoder.lora_alpha"]) == (4, 8.0)
    with safe_open(str(tmp_path / "out" / "learned_embeds.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["lowmcgm_handles"]) == SDXL_HANDLES


def _sdxl_meta_models() -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """SDXL base 1.0's UNet and first text encoder, shapes only (built on the meta device)."""
    folder = config_folder("sdxl-base")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    return unet, text_encoder


def _kohya_sdxl_unet_names(unet: UNet2DConditionModel) -> set[str]:
    """kohya's names, written independently of lowmcgm: every Linear and Conv2d inside a
    Transformer2DModel, its block renamed by kohya's hard-coded SDXL table (sdxl_model_util.py:
    down_blocks.i.attentions.j -> input_blocks.{3i+j+1}.1, up_blocks.i.attentions.j ->
    output_blocks.{3i+j}.1, mid_block.attentions.0 -> middle_block.1)."""
    def sgm(path: str) -> str:
        if path.startswith("mid_block"):
            return path.replace("mid_block.attentions.0", "middle_block.1")
        kind, i, _, j = path.split(".")[:4]
        index = 3 * int(i) + int(j) + (1 if kind == "down_blocks" else 0)
        rest = path.split(".", 4)[4]
        return f"{'input' if kind == 'down_blocks' else 'output'}_blocks.{index}.1.{rest}"

    names = set()
    for path, module in unet.named_modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        for sub, child in module.named_modules():
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                names.add("lora_unet_" + sgm(f"{path}.{sub}").replace(".", "_"))
    return names


def test_kohya_names_cover_every_module_of_a_real_sdxl_lora(tmp_path):
    unet, text_encoder = _sdxl_meta_models()
    expected_unet = _kohya_sdxl_unet_names(unet)  # before PEFT wraps the modules
    defaults = LoraConfig()
    add_lora(unet, defaults.unet_targets, 2, 8.0)
    add_lora(text_encoder, defaults.text_encoder_targets, 2, 8.0)

    def real(state):  # meta tensors -> small real ones of the same shapes
        return {k: torch.full(v.shape, 0.01) for k, v in state.items()}

    art = Artifact(handles=["<asset0>"], handle_vector_sets=[torch.zeros(1, 768), torch.ones(1, 1280)],
                   mask_encoder={}, unet_lora=real(lora_state_dict(unet)),
                   text_encoder_lora=real(lora_state_dict(text_encoder)),
                   meta={"base_model_version": "sdxl_base_v1-0", "resolution": 1024, "prediction_type": "epsilon",
                         "base_model": "stabilityai/stable-diffusion-xl-base-1.0",
                         "lora": {"mode": "lora", "rank": 2, "alpha": 8.0}})
    path = export_kohya(art, tmp_path / "xl.safetensors", dtype="fp16")
    with safe_open(str(path), "pt") as fh:
        keys = set(fh.keys())
        meta = fh.metadata()
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in keys}

    modules = {k.removesuffix(".lora_down.weight") for k in keys if k.endswith(".lora_down.weight")}
    unet_names = {m for m in modules if m.startswith("lora_unet_")}
    assert unet_names == expected_unet and len(unet_names) == 722
    clip_modules = ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj",
                    "self_attn_out_proj")
    assert modules - unet_names == {f"lora_te1_text_model_encoder_layers_{i}_{m}" for i in range(12)
                                    for m in clip_modules}
    tensors = {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert keys - tensors == {"bundle_emb.<asset0>.clip_l", "bundle_emb.<asset0>.clip_g"}
    assert (shapes["bundle_emb.<asset0>.clip_l"], shapes["bundle_emb.<asset0>.clip_g"]) == ((1, 768), (1, 1280))
    expected = {
        "ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": "2",
        "ss_network_alpha": "8.0", "ss_resolution": "(1024, 1024)", "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.resolution": "1024x1024", "modelspec.prediction_type": "epsilon",
    }
    assert {k: meta.get(k) for k in expected} == expected


def test_an_sdxl_unet_of_unknown_layout_is_refused_for_kohya_only(artifacts, tmp_path):
    """tiny-xl's 7 transformer blocks under a name lowmcgm cannot resolve: SDXL base's numbering
    (11 blocks) would name them wrongly, so kohya refuses; the other formats need no block numbers."""
    art = load_artifact(artifacts["unet_only"])
    renamed = dataclasses.replace(art, meta={**art.meta, "base_model": "my-sdxl-folder"})
    save_artifact(renamed, tmp_path / "renamed.safetensors", dtype="fp32")
    with pytest.raises(UserError, match=re.escape("not laid out as SDXL base's UNet (7 transformer blocks)")):
        export_artifact(tmp_path / "renamed.safetensors", "kohya", tmp_path / "lora.safetensors")
    assert not (tmp_path / "lora.safetensors").exists()
    assert len(export_artifact(tmp_path / "renamed.safetensors", "diffusers", tmp_path / "diff").files) == 2
    assert len(export_artifact(tmp_path / "renamed.safetensors", "embeddings", tmp_path / "emb").files) == 2


@pytest.mark.parametrize("bundle", [True, False], ids=["bundled", "unet-only"])
def test_import_lora_knows_an_sdxl_export_for_what_it_is(artifacts, tmp_path, bundle):
    # A UNet-only SDXL kohya file has no second text encoder's keys: its SGM block names and its
    # base version say SDXL, so phase 2 is not offered a start from it.
    from lowmcgm.interop.lora_import import read_lora_file

    out = tmp_path / "xl.safetensors"
    export_kohya(load_artifact(next(iter(artifacts.values()))), out, bundle_embeddings=bundle)
    with pytest.raises(UserError, match="is an SDXL LoRA; lowmcgm starts phase 2 from SD 1.x/2.x LoRAs only"):
        read_lora_file(out)
    with pytest.raises(UserError, match="is an SDXL LoRA"):  # the artifact itself, too
        read_lora_file(next(iter(artifacts.values())))
