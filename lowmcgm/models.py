"""Loading the base model's parts, and building the tiny SD-shaped test model.

A base model is whatever ``--base-model`` names: a diffusers folder, a hub id already in the local
Hugging Face cache, a single ``.safetensors`` checkpoint (read with configs shipped in
``lowmcgm/model_configs``), ``tiny``/``tiny-v`` (built here from a seed, no download) or ``toy``
(the toy-world model shipped in the package, see ``toy.py``). Everything
downstream reads text width, prediction type and resolution from the loaded configs, never from
constants.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lowmcgm.errors import UserError
from lowmcgm.tokenizer import build_clip_tokenizer

TINY_NAMES = ("tiny", "tiny-v")
TOY_NAME = "toy"  # the toy-world model bundled in lowmcgm/toy/weights (lowmcgm/toy.py)

# Words of the tiny tokenizer: enough for the prompts the method and the tests write.
TINY_WORDS = (
    "a photo of and the at on in with dog cat bird person toy running sitting standing lying "
    "jumping beach grass snow room street"
).split()


@dataclass
class BaseModel:
    """The parts of a Stable Diffusion model that lowmcgm trains against."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    name: str

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def text_width(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The resolution the model was trained at: UNet sample size times the VAE factor."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def config_hash(self) -> str:
        return compute_config_hash(self.unet.config, self.text_encoder.config.to_dict())

    @property
    def version_tag(self) -> str:
        """kohya's ``ss_base_model_version``: sd_v1, sd_v2 or sd_v2_v.

        SD 2.x UNets are the ones with linear transformer projections; the tiny models follow suit.
        """
        if not self.unet.config.use_linear_projection:
            return "sd_v1"
        return "sd_v2_v" if self.prediction_type == "v_prediction" else "sd_v2"


def compute_config_hash(unet_config: Any, text_config: dict[str, Any]) -> str:
    """A short hash of the architecture (not the weights), to refuse mismatched artifacts."""
    keep = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    text_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "projection_dim", "hidden_act")
    keep["text_encoder"] = {k: text_config.get(k) for k in text_keys}
    blob = json.dumps(keep, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_tiny_base(name: str = "tiny", seed: int = 0) -> BaseModel:
    """A small SD-shaped model with random weights, deterministic from ``seed``.

    ``tiny`` is SD 1.x-like (conv projections, epsilon); ``tiny-v`` is SD 2.x-like (linear
    projections, v-prediction, another text width). 64 px images, a 2x VAE and a four-level UNet,
    so the cross-attention layers at latent side / 4 sit where SD's do (``down_blocks.2``,
    ``up_blocks.1``) with 8x8 maps.
    """
    if name not in TINY_NAMES:
        raise ValueError(name)
    sd2 = name == "tiny-v"
    text_width = 48 if sd2 else 32
    tokenizer = build_clip_tokenizer(list(TINY_WORDS))
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=2 * text_width,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=text_width,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8, sample_size=64,
        )
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=text_width, attention_head_dim=2, use_linear_projection=sd2,
        )
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        prediction_type="v_prediction" if sd2 else "epsilon", steps_offset=1, clip_sample=False,
    )
    return BaseModel(tokenizer, text_encoder, vae, unet, scheduler, name=name)


def save_base_model(model: BaseModel, folder: Path) -> None:
    """Write a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` and lowmcgm load."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=model.noise_scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def load_base_model(spec: str, single_file_config: str = "auto") -> BaseModel:
    """Load the base model named by ``--base-model``; every failure is a UserError.

    Args:
        spec: ``tiny``/``tiny-v``, ``toy`` (the bundled toy-world model), a diffusers folder, a
            ``.safetensors`` file, or a hub id that is already in the local Hugging Face cache
            (nothing is downloaded).
        single_file_config: for single files, which shipped config to read them with.
    """
    if spec in TINY_NAMES:
        return build_tiny_base(spec)
    if spec == TOY_NAME:
        from lowmcgm.toy.bundled import load_toy_base

        return load_toy_base()
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, name=path.name)
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".bin"):
        if not path.is_file():
            raise UserError(f"Base model file not found: {path}.")
        if path.suffix != ".safetensors":
            raise UserError(f"Base model {path} is not a .safetensors file; lowmcgm never unpickles "
                            "checkpoints: convert it to .safetensors first.")
        from lowmcgm.single_file import load_single_file

        return load_single_file(path, single_file_config)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"Base model '{spec}' is neither a diffusers folder, a .safetensors file, "
                        "a hub id in the local cache, nor 'tiny' or 'toy'.")
    return _load_cached_hub_id(spec)


def _load_folder(folder: Path, name: str) -> BaseModel:
    missing = [p for p in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                           "scheduler/scheduler_config.json") if not (folder / p).is_file()]
    # transformers 5 silently builds an empty tokenizer when its files are absent.
    if not any((folder / "tokenizer" / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        missing.append("tokenizer/vocab.json")
    if missing:
        raise UserError(f"'{folder}' is not a Stable Diffusion model folder: {', '.join(missing)} "
                        "missing (expected the diffusers layout of model_index.json, unet/, vae/, "
                        "text_encoder/, tokenizer/, scheduler/).")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, EnvironmentError) as exc:
        raise UserError(f"Could not load the Stable Diffusion model in '{folder}': {exc}".rstrip(".") + ".") from exc
    return BaseModel(tokenizer, text_encoder, vae, unet, scheduler, name=name)


def _load_cached_hub_id(repo_id: str) -> BaseModel:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception as exc:  # the hub client raises several types for "not cached"
        raise UserError(f"Base model '{repo_id}' is not a local folder or file, and not in the local "
                        "Hugging Face cache (lowmcgm never downloads): download it first or pass "
                        "a folder.") from exc
    return _load_folder(Path(folder), name=repo_id)
