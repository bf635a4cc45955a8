"""Single-file SD checkpoints (``model.safetensors`` as A1111/ComfyUI users keep them).

The architecture is read from the configs shipped in ``lowmcgm/model_configs`` (no download); the
tokenizer vocabulary cannot ship, so it is taken from a ``tokenizer/`` folder beside the file or
from the local Hugging Face cache, and its absence is a clear error.
"""

from __future__ import annotations

from pathlib import Path

from lowmcgm.artifact import read_header
from lowmcgm.errors import UserError

# Key names of the original LDM layout (what every single-file SD checkpoint uses).
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TEXT_KEY = "cond_stage_model.model.token_embedding.weight"
# Where the tokenizer of each family lives in a Hugging Face cache, tried in order.
TOKENIZER_SOURCES = {
    "sd15": [("openai/clip-vit-large-patch14", None), ("runwayml/stable-diffusion-v1-5", "tokenizer"),
             ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer")],
    "sd21": [("stabilityai/stable-diffusion-2-1", "tokenizer"), ("stabilityai/stable-diffusion-2-1-base", "tokenizer")],
}
# CLIP's vocabulary has 49,408 entries; anything this small is a placeholder, not a tokenizer.
MIN_VOCAB = 1000
# A large single-file checkpoint may hold ~2,000 tensors; 64 MiB of header is far beyond any real one.
MAX_CHECKPOINT_HEADER = 64 * 2**20


def detect_family(path: Path) -> str:
    """``sd15`` or ``sd21`` from the checkpoint's key names; UserError for anything else."""
    header, _ = read_header(path, max_header_bytes=MAX_CHECKPOINT_HEADER)
    if UNET_KEY not in header:
        raise UserError(f"{path} is not a Stable Diffusion checkpoint (no UNet weights under "
                        "'model.diffusion_model.'); SDXL, LoRA and embedding files are not base models.")
    if SD1_TEXT_KEY in header:
        return "sd15"
    if SD2_TEXT_KEY in header:
        return "sd21"
    raise UserError(f"{path} has a UNet but no SD 1.x or 2.x text encoder; lowmcgm supports SD 1.x and 2.x.")


def _find_tokenizer(path: Path, family: str):
    from transformers import CLIPTokenizer

    beside = path.parent / "tokenizer"
    if (beside / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(beside)
    for repo, sub in TOKENIZER_SOURCES[family]:
        try:
            tokenizer = CLIPTokenizer.from_pretrained(repo, subfolder=sub or "", local_files_only=True)
        except (OSError, ValueError):
            continue
        # transformers 5 returns an empty tokenizer (2 specials) when the files are absent.
        if len(tokenizer) >= MIN_VOCAB:
            return tokenizer
    names = ", ".join(r for r, _ in TOKENIZER_SOURCES[family])
    raise UserError(f"The tokenizer for {path.name} was not found: put a 'tokenizer/' folder (vocab.json, "
                    f"merges.txt) beside it, or have one of {names} in the local Hugging Face cache.")


def load_single_file(path: Path, config_name: str = "auto"):
    """Load a single-file SD 1.x/2.x checkpoint into a BaseModel.

    Args:
        path: the ``.safetensors`` file.
        config_name: ``auto`` (SD 1.x -> sd15, SD 2.x -> sd21-768, as diffusers infers), or one of
            ``sd15``, ``sd21-base``, ``sd21-768`` to choose the resolution and prediction type.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from lowmcgm.model_configs import config_folder
    from lowmcgm.models import BaseModel

    family = detect_family(path)
    name = config_name if config_name != "auto" else ("sd15" if family == "sd15" else "sd21-768")
    if (name == "sd15") != (family == "sd15"):
        raise UserError(f"{path.name} is an {'SD 1.x' if family == 'sd15' else 'SD 2.x'} checkpoint, "
                        f"but model.single_file_config is '{name}'.")
    folder = config_folder(name)
    tokenizer = _find_tokenizer(path, family)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, local_files_only=True)
    except Exception as exc:  # diffusers raises SingleFileComponentError, OSError, ValueError, ...
        raise UserError(f"Could not read {path} as an SD checkpoint ({exc}).") from exc
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return BaseModel(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, scheduler, name=path.name)
