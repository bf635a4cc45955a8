"""Configs (not weights) of the base models lowmcgm knows by name, in diffusers folder layout.

Each folder holds ``model_index.json`` and the ``config.json`` of ``unet``, ``vae`` and
``text_encoder``, ``scheduler/scheduler_config.json`` and the tokenizer's ``tokenizer_config.json``
and ``special_tokens_map.json``. There is no weight file: the configs are enough to build the
architectures on the meta device (memory estimates). The tokenizer vocabulary is not here either:
``tokenizer.build_sd_tokenizer`` builds it from ``lowmcgm/models/vocab`` with these tokenizer configs.

- ``sd15``: runwayml/stable-diffusion-v1-5 (CLIP ViT-L/14 text encoder, epsilon, 512 px).
- ``sd21-base``: stabilityai/stable-diffusion-2-1-base (OpenCLIP ViT-H text, epsilon, 512 px).
- ``sd21-768``: stabilityai/stable-diffusion-2-1 (OpenCLIP ViT-H text, v_prediction, 768 px).
- ``sdxl-base``: stabilityai/stable-diffusion-xl-base-1.0 (CLIP ViT-L and OpenCLIP ViT-bigG text
  encoders, ``text_encoder_2`` and ``tokenizer_2`` beside the first pair; epsilon, 1024 px).
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

SHIPPED_CONFIGS: dict[str, Path] = {
    "sd15": _HERE / "sd15",
    "sd21-base": _HERE / "sd21-base",
    "sd21-768": _HERE / "sd21-768",
    "sdxl-base": _HERE / "sdxl-base",
}

# The Hugging Face repositories the shipped configs were taken from (for messages and caches).
HUB_IDS: dict[str, str] = {
    "sd15": "runwayml/stable-diffusion-v1-5",
    "sd21-base": "stabilityai/stable-diffusion-2-1-base",
    "sd21-768": "stabilityai/stable-diffusion-2-1",
    "sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0",
}


def config_folder(name: str) -> Path:
    """The folder of a shipped config by its short name.

    Args:
        name: one of ``SHIPPED_CONFIGS`` (``sd15``, ``sd21-base``, ``sd21-768``, ``sdxl-base``).

    Returns:
        The folder (diffusers layout, configs only).

    Raises:
        KeyError: for an unknown name; the message lists the known ones.
    """
    try:
        return SHIPPED_CONFIGS[name]
    except KeyError:
        known = ", ".join(sorted(SHIPPED_CONFIGS))
        raise KeyError(f"no shipped model config named {name!r}; known: {known}") from None
