"""One object per model family: what SD 1.x, SD 2.x and SDXL do differently, asked in one place.

OneTrainer keeps a class per model family (``modules/model/StableDiffusionXLModel.py``:
``encode_text``, ``create_pipeline``); lowmcgm's families are smaller, since ``BaseModel`` holds the
modules and ``text_conditioning`` encodes text for every family. A family answers what the rest of
the package would otherwise ask with an if: which diffusers pipeline samples it, what the UNet is
conditioned on besides the context (SDXL's pooled embedding and size numbers), how its VAE must be
cast, where its text encoders wait while sampling. ``base.family`` is one of ``FAMILIES``' objects;
code outside ``lowmcgm/models/`` asks it, never tests for it.

Adding a family (SD 3, Flux) is one more class here, its loader in ``folder``/``single_file``, and its
export name table in ``interop/``.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager
from typing import Any, Callable, Protocol

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lowmcgm.models.sdxl_conditioning import sdxl_time_ids
from lowmcgm.models.text_conditioning import encode_prompts

# The pipeline's four conditioning tensors: context and unconditional context, pooled and
# unconditional pooled embeddings (None, None on SD 1.x/2.x), as diffusers' ``encode_prompt`` returns them.
PipelineConditioning = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class FamilyModules(Protocol):
    """What a family reads: a ``BaseModel`` (this module cannot import it: base imports families)."""

    name: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    tokenizer_2: CLIPTokenizer | None
    text_encoder_2: CLIPTextModelWithProjection | None
    vae: Any
    unet: Any
    noise_scheduler: Any


class ModelFamily:
    """SD 1.x: one CLIP text encoder, its last hidden states as the only conditioning."""

    name = "sd1"
    label = "SD 1.x"  # what messages call it
    pooled_embedding = False  # conditioned on a pooled text embedding too (its artifacts record how it was pooled)
    text_encoder_count = 1
    # Sampling on a GPU without CPU offload: the text encoders wait on the CPU between prompts.
    text_encoders_wait_on_cpu = False
    # Latent pose guidance's backward through the UNet under gradient checkpointing. Not here: the
    # pass stops after the guided layers' block, and what it keeps is less than the VAE decode
    # needs after it (SD 1.5 at 512 px 0.34 against 0.38 GiB, SD 2.1 at 768 px 0.73 against 0.84;
    # both grow with the image alike), so the peak stays the decode's, and no block is run twice.
    guidance_checkpointing = False

    def version_tag(self, prediction_type: str) -> str:
        """kohya's ``ss_base_model_version``."""
        return "sd_v1"

    def build_pipeline(self, base: FamilyModules, scheduler: Any) -> DiffusionPipeline:
        """diffusers' stock pipeline over the base's own modules (no copies), with ``scheduler``."""
        with warnings.catch_warnings():
            # diffusers warns about UNets with sample_size < 64 (old SD 1 configs); the tiny model is one.
            warnings.simplefilter("ignore", FutureWarning)
            return StableDiffusionPipeline(
                vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def encode_for_pipeline(self, pipe: DiffusionPipeline, prompt: str, num: int, negative_prompt: str | None,
                            device: torch.device, encoders_on: Callable[[], AbstractContextManager]
                            ) -> PipelineConditioning:
        """Both classifier-free branches' conditioning for ``num`` images: here the pipeline's own."""
        return pipe.encode_prompt(prompt, device, num, True, negative_prompt)

    def photo_time_ids(self, base: FamilyModules, original_hw: tuple[int, int], crop_top_left: tuple[int, int],
                       side: int) -> torch.Tensor | None:
        """The size numbers a training photo's crop is conditioned on; None: this family takes none."""
        return None

    def added_cond_kwargs(self, base: FamilyModules, pooled: torch.Tensor | None, height: int, width: int
                          ) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` for images drawn at ``height`` x ``width``, as the pipeline
        gives its own passes; None: this family takes none."""
        return None

    def vae_needs_fp32(self, base: FamilyModules) -> bool:
        """The VAE must stay in fp32 (its half-precision latents overflow)."""
        return False


class SD2Family(ModelFamily):
    """SD 2.x: OpenCLIP ViT-H as its one text encoder; v-prediction at 768 px."""

    name = "sd2"
    label = "SD 2.x"

    def version_tag(self, prediction_type: str) -> str:
        return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"


class SDXLFamily(ModelFamily):
    """SDXL: two text encoders, a pooled embedding and six size numbers beside the context."""

    name = "sdxl"
    label = "SDXL"
    pooled_embedding = True
    text_encoder_count = 2
    # Its text encoders (1.5 GiB in fp16) run once per prompt; between prompts they wait on the CPU,
    # which keeps an sdxl-8gb artifact's sampling within 8 GB (docs/benchmarks.md, "Sampling memory").
    text_encoders_wait_on_cpu = True
    # Without checkpointing its guided pass keeps 8.1 GiB at 1024 px (with it 0.5; the decode 3.2).
    guidance_checkpointing = True

    def version_tag(self, prediction_type: str) -> str:
        return "sdxl_base_v1-0"

    def build_pipeline(self, base: FamilyModules, scheduler: Any) -> DiffusionPipeline:
        # No invisible watermark (diffusers adds one only where that package is installed): the
        # same artifact and seed draw the same pixels everywhere; the PNG chunks say how it was made.
        return StableDiffusionXLPipeline(
            vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
            tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=scheduler,
            add_watermarker=False)

    def encode_for_pipeline(self, pipe: DiffusionPipeline, prompt: str, num: int, negative_prompt: str | None,
                            device: torch.device, encoders_on: Callable[[], AbstractContextManager]
                            ) -> PipelineConditioning:
        # Without a negative prompt, diffusers' SDXL pipeline makes the unconditional context and
        # pooled embedding all zeros rather than encoding "" (force_zeros_for_empty_prompt: its
        # default, and SDXL base's model_index.json). We keep diffusers' behaviour, so the images
        # are the ones a stock SDXL pipeline draws.
        # The conditioning is ours (text_conditioning): the pipeline's encode_prompt would pool
        # SDXL's embedding at the highest token id, a handle's; given embeddings, it only repeats them.
        zeroed = negative_prompt is None and pipe.config.force_zeros_for_empty_prompt
        with encoders_on():
            text = encode_prompts(pipe, [prompt], device)
            uncond = None if zeroed else encode_prompts(pipe, [negative_prompt or ""], device)
        return pipe.encode_prompt(
            None, device=device, num_images_per_prompt=num, do_classifier_free_guidance=True,
            negative_prompt=negative_prompt, prompt_embeds=text.context, pooled_prompt_embeds=text.pooled,
            negative_prompt_embeds=None if uncond is None else uncond.context,
            negative_pooled_prompt_embeds=None if uncond is None else uncond.pooled)

    def photo_time_ids(self, base: FamilyModules, original_hw: tuple[int, int], crop_top_left: tuple[int, int],
                       side: int) -> torch.Tensor | None:
        # The photo's size as read and where the centre crop took the square from, as diffusers' and
        # kohya's SDXL trainers pass them.
        return sdxl_time_ids(base, original_hw, crop_top_left, (side, side))[0]

    def added_cond_kwargs(self, base: FamilyModules, pooled: torch.Tensor | None, height: int, width: int
                          ) -> dict[str, torch.Tensor] | None:
        # original = target = the image size, crop at (0, 0): what the pipeline's _get_add_time_ids
        # gives its own passes (tests/test_sdxl_conditioning.py holds the two equal).
        time_ids = sdxl_time_ids(base, (height, width), (0, 0), (height, width), batch=pooled.shape[0],
                                 dtype=pooled.dtype)
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device)}

    def vae_needs_fp32(self, base: FamilyModules) -> bool:
        # SDXL's VAE overflows in fp16 (NaN latents); its config says so (force_upcast), and diffusers'
        # SDXL pipeline and trainers keep it in fp32. SD 1.x/2.x VAEs are fine in half precision.
        return bool(base.vae.config.get("force_upcast", False))


FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (ModelFamily(), SD2Family(), SDXLFamily())}


def detect_family(unet_config: Any, has_second_text_encoder: bool) -> ModelFamily:
    """SDXL is the family with a second text encoder; SD 2.x UNets are the ones with linear
    transformer projections (the tiny models follow suit)."""
    if has_second_text_encoder:
        return FAMILIES["sdxl"]
    return FAMILIES["sd2" if unet_config.use_linear_projection else "sd1"]


def families_with_text_encoders(count: int) -> list[ModelFamily]:
    """The families whose models have ``count`` text encoders (an artifact holds rows for each)."""
    return [family for family in FAMILIES.values() if family.text_encoder_count == count]


def family_of_encoder_count(count: int) -> str:
    """What an artifact with handle rows for ``count`` text encoders was trained on, for messages."""
    return FAMILIES["sdxl"].label if count > 1 else "SD 1.x/2.x"
