"""Single-file checkpoints: family detection, clear errors, and a full-size SD 1.5 file that loads
with no tokenizer folder and no hub cache, trains, samples and exports."""

import gc
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_photo
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from ldm_checkpoint import build_ldm_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from lowmcgm.errors import UserError
from lowmcgm.models.configs import config_folder
from lowmcgm.models.loading import load_base_model
from lowmcgm.models.single_file import SD1_TEXT_KEY, SD2_TEXT_KEY, UNET_KEY, detect_family
from lowmcgm.models.tokenizer import CLIP_VOCAB_SIZE


def _fake(path, *keys):
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


def test_family_detection(tmp_path):
    assert detect_family(_fake(tmp_path / "a.safetensors", UNET_KEY, SD1_TEXT_KEY)) == "sd15"
    assert detect_family(_fake(tmp_path / "b.safetensors", UNET_KEY, SD2_TEXT_KEY)) == "sd21"
    with pytest.raises(UserError, match="not a Stable Diffusion checkpoint"):
        detect_family(_fake(tmp_path / "c.safetensors", "lora_unet_x.lora_down.weight"))
    with pytest.raises(UserError, match="no SD 1.x, 2.x or SDXL text encoder"):
        detect_family(_fake(tmp_path / "d.safetensors", UNET_KEY))


def test_an_empty_tokenizer_folder_beside_the_file_is_a_clear_error(tmp_path):
    path = _fake(tmp_path / "model.safetensors", UNET_KEY, SD1_TEXT_KEY)
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(UserError, match="holds no vocabulary"):
        load_base_model(str(path))


def test_weights_that_are_not_sd_are_a_clear_error(tmp_path):
    # The tokenizer is built in, so a file with the right key names but no weights reaches diffusers.
    path = _fake(tmp_path / "model.safetensors", UNET_KEY, SD1_TEXT_KEY)
    with pytest.raises(UserError, match="Could not read .* as an SD checkpoint"):
        load_base_model(str(path))


def test_config_must_match_the_family(tmp_path):
    path = _fake(tmp_path / "model.safetensors", UNET_KEY, SD1_TEXT_KEY)
    with pytest.raises(UserError, match="SD 1.x checkpoint"):
        load_base_model(str(path), single_file_config="sd21-768")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(UserError, match="not a safetensors file"):
        load_base_model(str(path))


# --- A full-size SD 1.5 file with random weights -------------------------------------------------

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _write_sd15_file(path):
    """SD 1.5's architecture from the shipped configs, seeded random weights, ldm keys, fp16 (2.1 GB)."""
    folder = config_folder("sd15")
    torch.manual_seed(0)
    # Each model is cast to fp16 before the next is built: the peak stays near one fp32 UNet.
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")).half()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")).half()
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")).half()
    save_file(build_ldm_state_dict(unet, vae, text_encoder, torch.float16), str(path))
    del unet, vae, text_encoder
    gc.collect()


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15_single_file")
    _write_sd15_file(folder / "sd15.safetensors")
    yield folder / "sd15.safetensors"
    (folder / "sd15.safetensors").unlink()  # 2 GB: not left for the end of the session


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "lowmcgm.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_sd15_single_file_loads_trains_samples_and_exports(sd15_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing can come from it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    photo, a, b = make_photo(tmp_path, size=64)
    run = tmp_path / "run"
    # Train and sample in child processes (their ~4 GB go back when they end), at 64 px to stay short.
    _run("train", "--preset", "tiny-cpu", "--base-model", str(sd15_file), "--image", photo, "--mask", a,
         "--mask", b, "--init-word", "dog", "--init-word", "cat", "--set", "model.resolution=64",
         "--set", "train.phase1_steps=1", "--set", "train.phase2_steps=1", "--set", "train.checkpoint_every=0",
         "--out", str(run))
    artifact = run / "lowmcgm.safetensors"
    _run("sample", "--artifact", str(artifact), "--base-model", str(sd15_file), "--prompt",
         "a photo of <asset0> and <asset1>", "--steps", "1", "--num-images", "1", "--out", str(tmp_path / "samples"))
    assert len(json.loads((tmp_path / "samples" / "samples.json").read_text())["prompts"][0]["images"]) == 1
    _run("export", str(artifact), "--format", "embeddings", "--out", str(tmp_path / "emb"))

    base = load_base_model(str(sd15_file))
    tokenizer = base.tokenizer
    assert len(tokenizer) == CLIP_VOCAB_SIZE and tokenizer.pad_token_id == 49407
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    # Every weight came through diffusers' conversion unchanged.
    loaded = build_ldm_state_dict(base.unet, base.vae, base.text_encoder, torch.float16)
    with safe_open(str(sd15_file), "pt") as f:
        assert set(loaded) == set(f.keys())
        for key in f.keys():
            assert torch.equal(loaded[key], f.get_tensor(key)), key
    del loaded

    # The handles, added to the real vocabulary, load into diffusers with load_textual_inversion.
    handles = load_file(str(artifact))
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=tokenizer, unet=base.unet,
                                   scheduler=base.noise_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for i, handle in enumerate(["<asset0>", "<asset1>"]):
        pipe.load_textual_inversion(str(tmp_path / "emb" / f"asset{i}.safetensors"), token=handle)
    ids = tokenizer("a photo of <asset0> and <asset1>").input_ids
    assert ids[4:7:2] == [49408, 49409] == tokenizer.convert_tokens_to_ids(["<asset0>", "<asset1>"])
    table = base.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == CLIP_VOCAB_SIZE + 2
    assert torch.equal(table[49408:], handles["handles.vectors"].to(table.dtype))
