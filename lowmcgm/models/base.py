"""The base model: the parts of a Stable Diffusion model that lowmcgm trains against.

A base model is whatever ``--base-model`` names (``loading.py`` finds and loads it). SDXL models (a
second tokenizer and text encoder, pooled text embeddings and size conditioning) load into the same
``BaseModel`` with ``tokenizer_2``/``text_encoder_2`` set; ``family`` tells them apart where the
paths differ (``text_conditioning``, ``sampler``, ``interop.export``, ``models.fit``). Everything
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

TOY_NAME = "toy"  # the toy-world model bundled in lowmcgm/toy/weights (lowmcgm/toy/bundled.py)
# SDXL's size conditioning: six numbers (original size, crop corner, target size), each embedded
# with addition_time_embed_dim sinusoids, beside the second text encoder's pooled embedding.
SDXL_TIME_IDS = 6


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
