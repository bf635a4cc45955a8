"""Settings that can only be checked against the loaded base model: the training resolution, the
LoRA target names, and what lowmcgm does not train on SDXL yet.

``train`` calls ``check_settings_fit`` once the weights are loaded and before it writes anything,
so a typo in a target name fails in seconds, not when phase 2 starts, and leaves no config.toml.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from lowmcgm.config import Config
from lowmcgm.errors import UserError
from lowmcgm.models.base import BaseModel

# SD 1.x/2.x UNets are trained at one size and still draw at twice it (SD 1.5 at 1024 px, SD 2.1-768
# at 1536), past which they tile and repeat subjects. Smaller sizes down to one UNet step work (tests
# train SD-shaped models at 64 px), so only the top is bounded.
MAX_RESOLUTION_FACTOR = 2
# SDXL was trained at 1024 px (after a 512 px stage it left behind) and draws poorly below about
# 768 px, so its training resolution is bounded below too: 3/4 of the model's own.
SDXL_MIN_RESOLUTION_FACTOR = 0.75


def check_settings_fit(cfg: Config, base: BaseModel) -> None:
    """Refuse a resolution the model cannot take and LoRA targets it does not have (one UserError)."""
    problems = sdxl_problems(cfg) if base.family.name == "sdxl" else []
    if cfg.model.resolution:
        problems += _resolution_problems(cfg.model.resolution, base)
    if cfg.lora.phase2_mode == "lora" and cfg.train.phase2_steps:
        problems += _target_problems("lora.unet_targets", cfg.lora.unet_targets, base.unet)
        if cfg.lora.use_text_encoder_lora:
            problems += _target_problems("lora.text_encoder_targets", cfg.lora.text_encoder_targets,
                                         base.text_encoder)
    if problems:
        raise UserError(f"Settings that do not fit base model '{base.name}': " + "; ".join(problems) + ".")


def _resolution_problems(resolution: int, base: BaseModel) -> list[str]:
    # The UNet halves the latent once per down block but the last; the VAE divides the pixels first.
    step = base.vae_scale_factor * 2 ** (len(base.unet.config.down_block_types) - 1)
    high = base.resolution * MAX_RESOLUTION_FACTOR
    problems = []
    if resolution % step:
        problems.append(f"model.resolution must be a multiple of {step} for this model (got {resolution})")
    if resolution > high:
        problems.append(f"model.resolution {resolution} is past {high} px, twice the size this model was trained "
                        f"at ({base.resolution} px); 0 takes {base.resolution}")
    low = sdxl_min_side(base)
    if base.family.name == "sdxl" and resolution < low:
        problems.append(f"model.resolution {resolution} is below {low} px: SDXL models were made for "
                        f"{base.resolution} px and draw poorly under 3/4 of it; 0 takes {base.resolution}")
    return problems


def sdxl_min_side(base: BaseModel) -> int:
    """The smallest square side an SDXL model draws well at: 3/4 of its own (768 px for SDXL base)."""
    return round(base.resolution * SDXL_MIN_RESOLUTION_FACTOR)


def preset_group_of_model(spec: str) -> str:
    """Which shipped presets a ``--base-model`` takes, read before (or without) loading it, as
    ``lowmcgm estimate`` does: ``sdxl`` (``sdxl-8gb``) for tiny-xl, the shipped sdxl-base and a
    folder with a second text encoder; ``sd`` (``8gb``) for SD 1.x and 2.x."""
    from lowmcgm.models.configs import SHIPPED_CONFIGS

    folder = SHIPPED_CONFIGS.get(spec) or Path(spec).expanduser()
    return "sdxl" if spec == "tiny-xl" or (folder / "text_encoder_2").is_dir() else "sd"


def problems_before_loading(cfg: Config, spec: str) -> list[str]:
    """``check_settings_fit``'s family rules for the model ``spec`` names, without loading it."""
    return sdxl_problems(cfg) if preset_group_of_model(spec) == "sdxl" else []


def sdxl_problems(cfg: Config) -> list[str]:
    """What lowmcgm does not train on SDXL yet (each needs the second text encoder, or an SDXL
    class-image pipeline, wired through training, export and the memory estimate)."""
    problems = []
    if cfg.train.use_prior_preservation:
        problems.append("train.use_prior_preservation is not supported on SDXL yet (set it to false)")
    if cfg.lora.use_text_encoder_lora:
        problems.append("lora.use_text_encoder_lora is not supported on SDXL yet (set it to false; the handles "
                        "still train in both text encoders)")
    if cfg.lora.phase2_mode == "full":
        problems.append("lora.phase2_mode 'full' is not supported on SDXL (use 'lora')")
    if cfg.lora.init_lora:
        problems.append("lora.init_lora is not supported on SDXL yet (phase 2 starts from a fresh LoRA)")
    return problems


def _target_problems(key: str, targets: tuple[str, ...], model: nn.Module) -> list[str]:
    """Each target must name at least one module, as PEFT matches them (the whole name or its tail)."""
    names = [name for name, _ in model.named_modules() if name]
    tails = sorted({name.split(".")[-1] for name in names} | {".".join(name.split(".")[-2:]) for name in names})
    problems = []
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            close = difflib.get_close_matches(target, tails, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{key} names '{target}', which no module of the {type(model).__name__} has{hint}")
    return problems


def check_sample_size(base: BaseModel, height: int, width: int) -> None:
    """Refuse an image size an SDXL model draws poorly at (one UserError); SD 1.x/2.x take any.

    SDXL was trained on many shapes of about its own area (1024x1024, 896x1152, 768x1344, ...), so
    the area is bounded, not the sides: at least that of the smallest training resolution allowed.
    """
    if base.family.name != "sdxl":
        return
    low = sdxl_min_side(base)
    if height * width < low * low:
        raise UserError(f"{width}x{height} is too small for SDXL model '{base.name}': it was made for images of "
                        f"about {base.resolution}x{base.resolution} pixels in area and draws poorly below "
                        f"{low}x{low}; pass --width and --height with at least that area (any shape).")
