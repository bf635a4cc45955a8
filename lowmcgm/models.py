"""Loading the base model's parts, and building the tiny SD-shaped test model.

A base model is whatever ``--base-model`` names: a diffusers folder, a hub id already in the local
Hugging Face cache, a single ``.safetensors`` checkpoint (read with configs shipped in
``lowmcgm/model_configs``), ``tiny``/``tiny-v``/``tiny-xl`` (built here from a seed, no download)
or ``toy`` (the toy-world model shipped in the package, see ``toy/bundled.py``). Everything
downstream reads text width, prediction type and resolution from the loaded configs, never from
constants.

SDXL models (a second tokenizer and text encoder, pooled text embeddings and size conditioning)
load into the same ``BaseModel`` with ``tokenizer_2``/``text_encoder_2`` set; ``family`` tells them
apart where the paths differ (``text_conditioning``, ``sampler``, ``interop.export``, ``model_fit``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lowmcgm.errors import UserError
from lowmcgm.tokenizer import build_clip_tokenizer

TINY_NAMES = ("tiny", "tiny-v", "tiny-xl")
TOY_NAME = "toy"  # the toy-world model bundled in lowmcgm/toy/weights (lowmcgm/toy/bundled.py)

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
    # SDXL's second (OpenCLIP ViT-bigG) tokenizer and text encoder; None for SD 1.x/2.x.
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def family(self) -> str:
        """``sd1``, ``sd2`` or ``sdxl``: SD 2.x UNets are the ones with linear transformer
        projections (the tiny models follow suit); SDXL the one with a second text encoder."""
        if self.text_encoder_2 is not None:
            return "sdxl"
        return "sd2" if self.unet.config.use_linear_projection else "sd1"

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
        second = self.text_encoder_2.config.to_dict() if self.text_encoder_2 is not None else None
        return compute_config_hash(self.unet.config, self.text_encoder.config.to_dict(), second)

    @property
    def version_tag(self) -> str:
        """kohya's ``ss_base_model_version``: sd_v1, sd_v2, sd_v2_v or sdxl_base_v1-0."""
        if self.family == "sdxl":
            return "sdxl_base_v1-0"
        if self.family == "sd1":
            return "sd_v1"
        return "sd_v2_v" if self.prediction_type == "v_prediction" else "sd_v2"


TEXT_HASH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "projection_dim",
                  "hidden_act")


def compute_config_hash(unet_config: Any, text_config: dict[str, Any],
                        text_config_2: dict[str, Any] | None = None) -> str:
    """A short hash of the architecture (not the weights), to refuse mismatched artifacts.

    ``text_config_2`` (SDXL's second text encoder) enters only when given, so SD 1.x/2.x hashes,
    and the artifacts that store them, stay as they were.
    """
    keep = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    keep["text_encoder"] = {k: text_config.get(k) for k in TEXT_HASH_KEYS}
    if text_config_2 is not None:
        keep["text_encoder_2"] = {k: text_config_2.get(k) for k in TEXT_HASH_KEYS}
    blob = json.dumps(keep, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


# SDXL's size conditioning: six numbers (original size, crop corner, target size), each embedded
# with addition_time_embed_dim sinusoids, beside the second text encoder's pooled embedding.
SDXL_TIME_IDS = 6


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
    from lowmcgm.model_configs import config_folder

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


def save_base_model(model: BaseModel, folder: Path) -> None:
    """Write a diffusers folder that diffusers' SD or SDXL pipeline and lowmcgm load."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if model.family == "sdxl":
        StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet,
            scheduler=model.noise_scheduler, add_watermarker=False,
        ).save_pretrained(folder)
        return
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
    kind, path, name = locate_base_model(spec)
    if kind == "tiny":
        return build_tiny_base(spec)
    if kind == "toy":
        from lowmcgm.toy.bundled import load_toy_base

        return load_toy_base()
    if kind == "file":
        from lowmcgm.single_file import load_single_file

        return load_single_file(path, single_file_config)
    return _load_folder(path, name)


def locate_base_model(spec: str) -> tuple[str, Path, str]:
    """What a ``--base-model`` names and where it lives, checked without reading weights.

    Returns:
        ``("folder", path, name)`` for a diffusers folder (a cached hub id's included),
        ``("file", path, name)`` for a single ``.safetensors`` file, or ``("tiny", Path(), spec)``
        / ``("toy", Path(), spec)`` for the models built in (nothing to find).

    Raises:
        UserError: what ``load_base_model`` would refuse before loading: a missing file or folder,
            a pickled checkpoint, a folder without the diffusers layout, a hub id not in the cache.
    """
    if spec in TINY_NAMES or spec == TOY_NAME:
        return ("tiny" if spec in TINY_NAMES else "toy"), Path(), spec
    path = Path(spec).expanduser()
    if path.is_dir():
        _check_folder_layout(path)
        return "folder", path, path.name
    if path.suffix in (".safetensors", ".ckpt", ".pt", ".bin"):
        if not path.is_file():
            raise UserError(f"Base model file not found: {path}.")
        if path.suffix != ".safetensors":
            raise UserError(f"Base model {path} is not a .safetensors file; lowmcgm never unpickles "
                            "checkpoints: convert it to .safetensors first.")
        return "file", path, path.name
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise UserError(f"Base model '{spec}' is neither a diffusers folder, a .safetensors file, "
                        "a hub id in the local cache, nor 'tiny' or 'toy'.")
    folder = _cached_hub_folder(spec)
    _check_folder_layout(folder)
    return "folder", folder, spec


def _check_folder_layout(folder: Path) -> None:
    missing = [p for p in ("unet/config.json", "vae/config.json", "text_encoder/config.json",
                           "scheduler/scheduler_config.json") if not (folder / p).is_file()]
    # transformers 5 silently builds an empty tokenizer when its files are absent.
    if not any((folder / "tokenizer" / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        missing.append("tokenizer/vocab.json")
    if missing:
        raise UserError(f"'{folder}' is not a Stable Diffusion model folder: {', '.join(missing)} "
                        "missing (expected the diffusers layout of model_index.json, unet/, vae/, "
                        "text_encoder/, tokenizer/, scheduler/).")
    # SDXL: the second pair sits beside the first (model_index.json names text_encoder_2).
    if (folder / "text_encoder_2").is_dir() or (folder / "tokenizer_2").is_dir():
        missing = [p for p in ("text_encoder_2/config.json",) if not (folder / p).is_file()]
        if not any((folder / "tokenizer_2" / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            missing.append("tokenizer_2/vocab.json")
        if missing:
            raise UserError(f"'{folder}' looks like an SDXL model folder but {', '.join(missing)} is missing.")


def _load_folder(folder: Path, name: str) -> BaseModel:
    """A diffusers folder ``locate_base_model`` checked."""
    xl = (folder / "text_encoder_2").is_dir() or (folder / "tokenizer_2").is_dir()
    try:
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        second = {}
        if xl:
            second = {"tokenizer_2": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
                      "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")}
    except (OSError, ValueError, EnvironmentError) as exc:
        raise UserError(f"Could not load the Stable Diffusion model in '{folder}': {exc}".rstrip(".") + ".") from exc
    return BaseModel(tokenizer, text_encoder, vae, unet, scheduler, name=name, **second)


def _cached_hub_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # the hub client raises several types for "not cached"
        raise UserError(f"Base model '{repo_id}' is not a local folder or file, and not in the local "
                        "Hugging Face cache (lowmcgm never downloads): download it first or pass "
                        "a folder.") from exc
