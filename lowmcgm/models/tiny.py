"""The tiny SD-shaped test models: the shipped real configs shrunk (sizes only), random weights.

``tiny`` is SD 1.5 shrunk, ``tiny-v`` SD 2.1-768, ``tiny-xl`` SDXL base; each is deterministic from
a seed and needs no download.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lowmcgm.models.base import BaseModel
from lowmcgm.models.sdxl_conditioning import SDXL_TIME_IDS
from lowmcgm.models.tokenizer import build_clip_tokenizer

TINY_NAMES = ("tiny", "tiny-v", "tiny-xl")

# Words of the tiny tokenizer: enough for the prompts the method and the tests write.
TINY_WORDS = (
    "a photo of and the at on in with dog cat bird person toy running sitting standing lying "
    "jumping beach grass snow room street"
).split()


# The tiny models are the shipped real configs with only their sizes changed, so that every other
# field (token ids such as SDXL's legacy eos_token_id 2, prediction type, scheduler, force_upcast,
# upcast_attention, projections) carries the real model's quirks into the tests: a tiny model that
# set its own eos_token_id hid a pooling defect that only the real config shows.
TINY_REAL_CONFIGS = {"tiny": "sd15", "tiny-v": "sd21-768", "tiny-xl": "sdxl-base"}
# The size fields each component may change, and nothing else (tests/test_models.py compares).
UNET_SIZE_KEYS = ("sample_size", "block_out_channels", "layers_per_block", "norm_num_groups", "cross_attention_dim",
                  "attention_head_dim", "transformer_layers_per_block", "addition_time_embed_dim",
                  "projection_class_embeddings_input_dim")
VAE_SIZE_KEYS = ("sample_size", "block_out_channels", "layers_per_block", "norm_num_groups", "down_block_types",
                 "up_block_types")
TEXT_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "projection_dim")
# 64 px images through a 2x VAE: 32x32 latents.
TINY_VAE_SIZES = {"sample_size": 64, "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
                  "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}


def _tiny_text_sizes(width: int, vocab_size: int) -> dict[str, int]:
    return {"vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
            "num_attention_heads": 2, "projection_dim": width}


def build_tiny_base(name: str = "tiny", seed: int = 0) -> BaseModel:
    """A small model with random weights, deterministic from ``seed``, shrunk from a real config.

    ``tiny`` is SD 1.5 shrunk (conv projections, epsilon); ``tiny-v`` is SD 2.1-768 shrunk (linear
    projections, v-prediction, upcast attention, another text width). 64 px images, a 2x VAE and a
    four-level UNet, so the cross-attention layers at latent side / 4 sit where SD's do
    (``down_blocks.2``, ``up_blocks.1``) with 8x8 maps. ``tiny-xl`` is SDXL shrunk: see ``build_tiny_xl``.
    """
    if name not in TINY_NAMES:
        raise ValueError(name)
    if name == "tiny-xl":
        return build_tiny_xl(seed)
    real = TINY_REAL_CONFIGS[name]
    width = 48 if name == "tiny-v" else 32
    tokenizer = _tiny_tokenizer(real, "tokenizer")
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's generator untouched
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_shrunk_text_config(real, "text_encoder", _tiny_text_sizes(width, len(tokenizer))))
        vae = AutoencoderKL.from_config(_shrunk_config(real, "vae", TINY_VAE_SIZES, VAE_SIZE_KEYS))
        unet = UNet2DConditionModel.from_config(_shrunk_config(real, "unet", {
            "sample_size": 32, "block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8,
            "cross_attention_dim": width, "attention_head_dim": 2}, UNET_SIZE_KEYS))
    return BaseModel(tokenizer, text_encoder, vae, unet, _real_scheduler(real), name=name)


def build_tiny_xl(seed: int = 0) -> BaseModel:
    """SDXL base shrunk, with random weights, deterministic from ``seed``.

    As SDXL: two CLIP text encoders (the second with a projection, whose pooled output and six
    size numbers condition the UNet through ``text_time`` embeddings; its config keeps SDXL's
    legacy ``eos_token_id`` 2), their hidden states concatenated as the context (32 + 32 = 64
    wide), linear projections, epsilon prediction, and three UNet levels of which the first has no
    cross-attention. 64 px images and a 2x VAE give 32x32 latents, so the cross-attention levels
    have 16x16 and 8x8 maps (SDXL at 1024 px: 64 and 32).
    """
    real = TINY_REAL_CONFIGS["tiny-xl"]
    tokenizer = _tiny_tokenizer(real, "tokenizer")
    tokenizer_2 = _tiny_tokenizer(real, "tokenizer_2")  # pads with "!" (id 0), as OpenCLIP does
    width, time_dim = 32, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_shrunk_text_config(real, "text_encoder", _tiny_text_sizes(width, len(tokenizer))))
        text_encoder_2 = CLIPTextModelWithProjection(
            _shrunk_text_config(real, "text_encoder_2", _tiny_text_sizes(width, len(tokenizer_2))))
        vae = AutoencoderKL.from_config(_shrunk_config(real, "vae", TINY_VAE_SIZES, VAE_SIZE_KEYS))
        unet = UNet2DConditionModel.from_config(_shrunk_config(real, "unet", {
            "sample_size": 32, "block_out_channels": (16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8,
            "transformer_layers_per_block": (1, 1, 2), "cross_attention_dim": 2 * width, "attention_head_dim": (2, 4, 4),
            "addition_time_embed_dim": time_dim, "projection_class_embeddings_input_dim": width + SDXL_TIME_IDS * time_dim,
        }, UNET_SIZE_KEYS))
    return BaseModel(tokenizer, text_encoder, vae, unet, _real_scheduler(real), name="tiny-xl",
                     tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)


def _real_config(real: str, path: str) -> dict[str, Any]:
    from lowmcgm.models.configs import config_folder

    return json.loads((config_folder(real) / path).read_text())


def _shrunk_config(real: str, component: str, sizes: dict[str, Any], size_keys: tuple[str, ...]) -> dict[str, Any]:
    """``component``'s shipped config with ``sizes`` put in; a key that is not a size is refused."""
    odd = sorted(set(sizes) - set(size_keys))
    if odd:
        raise ValueError(f"not size fields of {component}: {odd}")
    # Fields starting with "_" say who wrote the file, not what the model is; a real SD 1.5 config's
    # "_diffusers_version" 0.6.0 would make diffusers' SD pipeline rewrite a tiny sample_size.
    config = {k: v for k, v in _real_config(real, f"{component}/config.json").items() if not k.startswith("_")}
    return {**config, **sizes}


def _shrunk_text_config(real: str, component: str, sizes: dict[str, int]) -> CLIPTextConfig:
    config = {k: v for k, v in _shrunk_config(real, component, sizes, TEXT_SIZE_KEYS).items()
              if k not in ("architectures", "transformers_version", "torch_dtype")}
    return CLIPTextConfig(**config)


def _tiny_tokenizer(real: str, subfolder: str) -> CLIPTokenizer:
    """The tiny vocabulary (one token per ``TINY_WORDS`` word, then ``<|startoftext|>`` and
    ``<|endoftext|>`` last, as in CLIP's) with the real tokenizer's pad token and length."""
    config = _real_config(real, f"{subfolder}/tokenizer_config.json")
    pad = config["pad_token"]["content"] if isinstance(config["pad_token"], dict) else config["pad_token"]
    tokenizer = build_clip_tokenizer(list(TINY_WORDS), model_max_length=config["model_max_length"])
    tokenizer.pad_token_id = tokenizer.get_vocab()[pad]  # by id: see tokenizer.build_sd_tokenizer
    return tokenizer


def _real_scheduler(real: str) -> DDPMScheduler:
    """The real model's training schedule (its scheduler config read as DDPM's)."""
    return DDPMScheduler.from_config(_real_config(real, "scheduler/scheduler_config.json"))
