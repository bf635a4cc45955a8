"""Diffusers model folders: writing one, checking its layout, loading it, finding a cached hub id."""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lowmcgm.errors import UserError
from lowmcgm.models.base import BaseModel


def save_base_model(model: BaseModel, folder: Path) -> None:
    """Write a diffusers folder that diffusers' SD or SDXL pipeline and lowmcgm load."""
    model.family.build_pipeline(model, model.noise_scheduler).save_pretrained(folder)


def check_folder_layout(folder: Path) -> None:
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


def load_folder(folder: Path, name: str) -> BaseModel:
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


def cached_hub_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # the hub client raises several types for "not cached"
        raise UserError(f"Base model '{repo_id}' is not a local folder or file, and not in the local "
                        "Hugging Face cache (lowmcgm never downloads): download it first or pass "
                        "a folder.") from exc
