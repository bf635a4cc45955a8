"""Single-file SD checkpoints (``model.safetensors`` as A1111/ComfyUI users keep them).

The architecture is read from the configs shipped in ``lowmcgm/models/configs`` and the tokenizer is
built from the CLIP vocabulary shipped in ``lowmcgm/models/vocab`` (``tokenizer.build_sd_tokenizer``), so
the file needs nothing else: no download, no hub cache. A ``tokenizer/`` folder beside the file,
when there is one, is used instead (a model whose vocabulary was changed).
"""

from __future__ import annotations

from pathlib import Path

from lowmcgm.artifact import read_header
from lowmcgm.errors import UserError

# Key names of the original LDM layout (what every single-file SD checkpoint uses).
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TEXT_KEY = "cond_stage_model.model.token_embedding.weight"
# SDXL's two text encoders (CLIP ViT-L, OpenCLIP ViT-bigG) under its "conditioner".
SDXL_TEXT_KEYS = ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                  "conditioner.embedders.1.model.token_embedding.weight")
# CLIP's vocabulary has 49,408 entries; anything this small is a placeholder, not a tokenizer.
MIN_VOCAB = 1000
# A large single-file checkpoint may hold ~2,000 tensors; 64 MiB of header is far beyond any real one.
MAX_CHECKPOINT_HEADER = 64 * 2**20


def detect_family(path: Path) -> str:
    """``sd15``, ``sd21`` or ``sdxl`` from the checkpoint's key names; UserError for anything else."""
    header, _ = read_header(path, max_header_bytes=MAX_CHECKPOINT_HEADER)
    if UNET_KEY not in header:
        raise UserError(f"{path} is not a Stable Diffusion checkpoint (no UNet weights under "
                        "'model.diffusion_model.'); LoRA and embedding files are not base models.")
    if SD1_TEXT_KEY in header:
        return "sd15"
    if SD2_TEXT_KEY in header:
        return "sd21"
    if all(key in header for key in SDXL_TEXT_KEYS):
        return "sdxl"
    raise UserError(f"{path} has a UNet but no SD 1.x, 2.x or SDXL text encoder (an SDXL refiner, or another "
                    "model family); lowmcgm supports SD 1.x, 2.x and SDXL base models.")


def _load_tokenizer(path: Path, config_name: str):
    from transformers import CLIPTokenizer

    from lowmcgm.models.tokenizer import build_sd_tokenizer

    beside = path.parent / "tokenizer"
    if not beside.is_dir():
        return build_sd_tokenizer(config_name)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(beside)
    except (OSError, ValueError) as exc:
        raise UserError(f"Could not read the tokenizer folder {beside} ({exc}); remove it to use the built-in "
                        "SD tokenizer.") from exc
    # transformers 5 builds an empty tokenizer (2 specials) when vocab.json/merges.txt are absent.
    if len(tokenizer) < MIN_VOCAB:
        raise UserError(f"The tokenizer folder {beside} holds no vocabulary (vocab.json and merges.txt, or "
                        "tokenizer.json); remove it to use the built-in SD tokenizer.")
    return tokenizer


def load_single_file(path: Path, config_name: str = "auto"):
    """Load a single-file SD 1.x/2.x or SDXL checkpoint into a BaseModel.

    Args:
        path: the ``.safetensors`` file.
        config_name: ``auto`` (SD 1.x -> sd15, SD 2.x -> sd21-768, as diffusers infers, SDXL ->
            sdxl-base), or one of ``sd15``, ``sd21-base``, ``sd21-768``, ``sdxl-base`` to choose the
            resolution and prediction type.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from lowmcgm.models.base import BaseModel
    from lowmcgm.models.configs import config_folder

    family = detect_family(path)
    name = config_name if config_name != "auto" else AUTO_CONFIG[family]
    if name not in CONFIGS_OF[family]:
        raise UserError(f"{path.name} is an {FAMILY_NAMES[family]} checkpoint, but model.single_file_config is "
                        f"'{name}' (use auto or {' or '.join(CONFIGS_OF[family])}).")
    folder = config_folder(name)
    tokenizer = _load_tokenizer(path, name)
    try:
        if family == "sdxl":
            from lowmcgm.models.tokenizer import build_sd_tokenizer

            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), config=str(folder), tokenizer=tokenizer, tokenizer_2=build_sd_tokenizer(name, "tokenizer_2"),
                local_files_only=True)
        else:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=str(folder), tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False, local_files_only=True)
    except Exception as exc:  # diffusers raises SingleFileComponentError, OSError, ValueError, ...
        raise UserError(f"Could not read {path} as an {'SDXL' if family == 'sdxl' else 'SD'} checkpoint ({exc}).") from exc
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    second = {"tokenizer_2": pipe.tokenizer_2, "text_encoder_2": pipe.text_encoder_2} if family == "sdxl" else {}
    return BaseModel(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, scheduler, name=path.name, **second)


# detect_family's names: what users call them, the shipped configs that fit, and what auto picks.
FAMILY_NAMES = {"sd15": "SD 1.x", "sd21": "SD 2.x", "sdxl": "SDXL"}
CONFIGS_OF = {"sd15": ("sd15",), "sd21": ("sd21-base", "sd21-768"), "sdxl": ("sdxl-base",)}
AUTO_CONFIG = {"sd15": "sd15", "sd21": "sd21-768", "sdxl": "sdxl-base"}
