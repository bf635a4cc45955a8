"""The base model: the parts of a Stable Diffusion model that lowmcgm trains against.

A base model is whatever ``--base-model`` names (``loading.py`` finds and loads it). SDXL models (a
second tokenizer and text encoder, pooled text embeddings and size conditioning) load into the same
``BaseModel`` with ``tokenizer_2``/``text_encoder_2`` set; ``family`` (``families.py``) owns what
differs between them, and code outside ``models/`` asks it rather than testing which it is. Everything
downstream reads text width, prediction type and resolution from the loaded configs, never from
constants.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lowmcgm.models.families import ModelFamily, detect_family

TOY_NAME = "toy"  # the toy-world model bundled in lowmcgm/toy/weights (lowmcgm/toy/bundled.py)


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
    def family(self) -> ModelFamily:
        """SD 1.x, SD 2.x or SDXL (``families.FAMILIES``): what differs between them is asked of it."""
        return detect_family(self.unet.config, self.text_encoder_2 is not None)

    @property
    def text_encoders(self) -> list[CLIPTextModel]:
        """Each text encoder, first one first (SDXL has two)."""
        return [encoder for _, encoder in self.text_encoder_pairs]

    @property
    def text_encoder_pairs(self) -> list[tuple[CLIPTokenizer, CLIPTextModel]]:
        """Each (tokenizer, text encoder) pair, first one first: handles are tokens of every pair."""
        pairs = [(self.tokenizer, self.text_encoder)]
        if self.text_encoder_2 is not None:
            pairs.append((self.tokenizer_2, self.text_encoder_2))
        return pairs

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
        return self.family.version_tag(self.prediction_type)


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
