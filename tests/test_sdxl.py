"""SDXL base models, as far as they go today: the shipped config, the tiny SDXL-shaped model, loading
folders and single files, and one clear line wherever lowmcgm cannot use them yet."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lowmcgm.errors import UserError
from lowmcgm.models.base import compute_config_hash
from lowmcgm.models.configs import config_folder
from lowmcgm.models.folder import save_base_model
from lowmcgm.models.loading import load_base_model
from lowmcgm.models.single_file import SD1_TEXT_KEY, SDXL_TEXT_KEYS, UNET_KEY, detect_family
from lowmcgm.models.tiny import build_tiny_base
from lowmcgm.models.tokenizer import CLIP_VOCAB_SIZE, build_sd_tokenizer


@pytest.fixture(scope="module")
def tiny_xl():
    return build_tiny_base("tiny-xl")


def test_shipped_sdxl_config_builds_sdxl_base_at_its_published_size():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = config_folder("sdxl-base")
    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
        }
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    # stabilityai/stable-diffusion-xl-base-1.0's parameter counts (its model card: a 2.6B UNet).
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == 768 + 1280  # both encoders' hidden states, concatenated
    assert unet["projection_class_embeddings_input_dim"] == 1280 + 6 * unet["addition_time_embed_dim"]
    assert unet["sample_size"] * 8 == 1024


def test_sdxl_tokenizers_are_built_offline_with_their_own_pads():
    first, second = build_sd_tokenizer("sdxl-base"), build_sd_tokenizer("sdxl-base", "tokenizer_2")
    assert len(first) == len(second) == CLIP_VOCAB_SIZE
    assert first.pad_token_id == first.eos_token_id == 49407  # CLIP ViT-L pads with <|endoftext|>
    assert second.pad_token_id == 0  # OpenCLIP pads with "!" (id 0), and "!!!" stays one token
    assert first("a dog!!!").input_ids == second("a dog!!!").input_ids


def test_tiny_xl_is_sdxl_shaped(tiny_xl):
    assert tiny_xl.family.name == "sdxl" and tiny_xl.version_tag == "sdxl_base_v1-0"
    assert build_tiny_base("tiny").family.name == "sd1" and build_tiny_base("tiny-v").family.name == "sd2"
    widths = tiny_xl.text_encoder.config.hidden_size + tiny_xl.text_encoder_2.config.hidden_size
    assert tiny_xl.text_width == widths and tiny_xl.resolution == 64
    ids = [t(["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
           for t in (tiny_xl.tokenizer, tiny_xl.tokenizer_2)]
    with torch.no_grad():
        first = tiny_xl.text_encoder(ids[0], output_hidden_states=True)
        second = tiny_xl.text_encoder_2(ids[1], output_hidden_states=True)
    context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    cond = {"text_embeds": second.text_embeds, "time_ids": time_ids}
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny_xl.unet(latents, 10, context, added_cond_kwargs=cond).sample
        # The size numbers reach the output (SDXL's micro-conditioning).
        resized = tiny_xl.unet(latents, 10, context, added_cond_kwargs={**cond, "time_ids": time_ids * 2}).sample
    assert out.shape == (1, 4, 32, 32) and not torch.allclose(out, resized)


def test_sd_config_hashes_are_unchanged_and_sdxl_hashes_its_second_encoder(tiny_xl):
    # Artifacts store these: the values of the SD 1.x/2.x formula before SDXL existed.
    assert build_tiny_base("tiny").config_hash == "b193ae7530a68a0a"
    # tiny-v now carries SD 2.1-768's upcast_attention; with the value it had then, the formula gives
    # the same hash as before.
    tiny_v = build_tiny_base("tiny-v")
    assert tiny_v.unet.config.upcast_attention is True
    then = compute_config_hash({**tiny_v.unet.config, "upcast_attention": False}, tiny_v.text_encoder.config.to_dict())
    assert then == "1bb912dded24dbf3" and tiny_v.config_hash != then
    te = tiny_xl.text_encoder.config.to_dict()
    without = compute_config_hash(tiny_xl.unet.config, te)
    assert tiny_xl.config_hash != without


def test_an_sdxl_folder_loads_in_lowmcgm_and_in_diffusers(tiny_xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "xl"
    save_base_model(tiny_xl, folder)
    loaded = load_base_model(str(folder))
    assert loaded.family.name == "sdxl" and loaded.config_hash == tiny_xl.config_hash
    assert loaded.tokenizer_2.pad_token_id == 0
    for a, b in zip(tiny_xl.text_encoder_2.state_dict().values(), loaded.text_encoder_2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    image = pipe("a photo of a dog", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_an_sdxl_folder_without_its_second_tokenizer_is_a_clear_error(tiny_xl, tmp_path):
    import shutil

    folder = tmp_path / "xl"
    save_base_model(tiny_xl, folder)
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(UserError, match="SDXL model folder but tokenizer_2/vocab.json is missing"):
        load_base_model(str(folder))


def _fake(path, *keys):
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


def test_sdxl_single_files_are_recognised_and_checked(tmp_path):
    xl = _fake(tmp_path / "xl.safetensors", UNET_KEY, *SDXL_TEXT_KEYS)
    assert detect_family(xl) == "sdxl"
    with pytest.raises(UserError, match="SDXL refiner"):  # only the second encoder: not a base model
        detect_family(_fake(tmp_path / "refiner.safetensors", UNET_KEY, SDXL_TEXT_KEYS[1]))
    with pytest.raises(UserError, match="is an SDXL checkpoint, but model.single_file_config is 'sd15'"):
        load_base_model(str(xl), single_file_config="sd15")
    with pytest.raises(UserError, match="is an SD 1.x checkpoint, but .* 'sdxl-base'"):
        load_base_model(str(_fake(tmp_path / "sd1.safetensors", UNET_KEY, SD1_TEXT_KEY)), "sdxl-base")
    # The right names but no weights reach diffusers' SDXL loader, and come back as one line.
    with pytest.raises(UserError, match="Could not read .* as an SDXL checkpoint"):
        load_base_model(str(xl))
