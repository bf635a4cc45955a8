"""The export's name tables, one object per family: how SD 1.x/2.x and SDXL artifacts are laid out
in the files other tools read.

An artifact holds the handles' rows of each text encoder it was trained with (``Artifact.handle_vector_sets``:
one for SD 1.x/2.x, two for SDXL), and that is what picks its layout (``export_layout``):

- SD 1.x/2.x: kohya names are the diffusers paths with dots as underscores (``lora_unet_*``,
  ``lora_te_text_model_*``); an embedding is A1111's ``string_to_param.*``; diffusers' embeddings
  file is ``{handle: vector}``.
- SDXL: kohya names the SGM UNet's blocks (``sdxl_names``) and ``lora_te1_`` for the first encoder;
  an embedding holds ``clip_l`` and ``clip_g`` rows; diffusers' embeddings file holds both, in handle order.

A new family's export is one more class here and its entry in ``LAYOUTS``.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from lowmcgm.artifact import Artifact, vector_keys_in
from lowmcgm.errors import UserError
from lowmcgm.interop.formats import (A1111_EMBEDDING_KEY, KOHYA_TE_PREFIX, KOHYA_UNET_PREFIX, SDXL_CLIP_G_KEY,
                                     SDXL_CLIP_L_KEY, strip_text_model)
from lowmcgm.interop.sdxl_names import (build_sgm_attention_blocks, collect_attention_blocks,
                                        kohya_sdxl_text_encoder_stem, kohya_sdxl_unet_stem)

# The UNet layout of every SDXL model lowmcgm loads (base and fine-tunes alike), shipped in models/configs.
SDXL_CONFIG = "sdxl-base"


class ExportLayout:
    """SD 1.x/2.x: one text encoder, diffusers' module paths under kohya's prefixes."""

    sdxl = False  # what the command line tells the user about the embeddings' rows
    label = "SD 1.x/2.x"  # what messages call the files of this layout
    pipeline_class: type[DiffusionPipeline] = StableDiffusionPipeline  # whose save_lora_weights writes diffusers' file
    importable = True  # lora_import reads these names (a LoRA to start phase 2 from)

    def names_a_file(self, header: dict[str, Any], metadata: dict[str, str]) -> bool:
        """Whether a LoRA file's keys and metadata are this layout's (``layout_of_lora_file``): the
        layout of one text encoder and diffusers' module paths is what every other one is not."""
        return True

    def kohya_module_names(self, artifact: Artifact, part: str, paths: list[str]) -> dict[str, str]:
        """kohya's name (without ``.lora_down.weight`` etc.) of each LoRA module of the artifact.

        Args:
            part: ``unet`` or ``text_encoder``.
            paths: the modules' diffusers/transformers paths, as PEFT names them.
        """
        prefix = KOHYA_UNET_PREFIX if part == "unet" else KOHYA_TE_PREFIX
        return {path: prefix + strip_text_model(path).replace(".", "_") for path in paths}

    def embedding_tensors(self, artifact: Artifact, index: int) -> dict[str, torch.Tensor]:
        """Handle ``index``'s textual-inversion tensors (fp32), as A1111 and ComfyUI read them."""
        return {A1111_EMBEDDING_KEY: artifact.handle_vectors[index].float()[None]}

    def diffusers_embeddings(self, artifact: Artifact) -> dict[str, torch.Tensor]:
        """``learned_embeds.safetensors``'s tensors (fp32): ``{handle: (d,)}``, each entry one
        ``load_textual_inversion({token: vector})``."""
        return {handle: vector.float() for handle, vector in zip(artifact.handles, artifact.handle_vectors)}


class SDXLExportLayout(ExportLayout):
    """SDXL: two text encoders, the SGM UNet's block names, a clip_l and a clip_g row per handle."""

    sdxl = True
    label = "SDXL"
    pipeline_class = StableDiffusionXLPipeline
    importable = False

    def names_a_file(self, header: dict[str, Any], metadata: dict[str, str]) -> bool:
        # A second text encoder's keys or handle rows (an SDXL artifact), kohya's SDXL base version,
        # or SGM UNet block names (kohya's SDXL naming: ``lora_unet_input_blocks_*``,
        # ``_middle_block_``, ``_output_blocks_``; SD 1.x/2.x files keep diffusers' ``down_blocks``/
        # ``up_blocks``), as lowmcgm's own SDXL exports have.
        sgm = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
        return (metadata.get("ss_base_model_version", "").startswith("sdxl") or len(vector_keys_in(header)) > 1
                or any(k.startswith(("lora_te2_", "text_encoder_2.", *sgm)) for k in header))

    def kohya_module_names(self, artifact: Artifact, part: str, paths: list[str]) -> dict[str, str]:
        """Raises UserError: an SDXL UNet module kohya's SGM names do not cover, or an SDXL UNet whose
        layout lowmcgm does not know (``sdxl_unet_config``)."""
        if part == "text_encoder":  # lowmcgm adapts SDXL's first text encoder only (MCGMState.add_adapters)
            return {path: kohya_sdxl_text_encoder_stem(path, 1) for path in paths}
        if not paths:
            return {}
        unet_config = sdxl_unet_config(artifact, paths)
        return {path: kohya_sdxl_unet_stem(path, unet_config) for path in paths}

    def embedding_tensors(self, artifact: Artifact, index: int) -> dict[str, torch.Tensor]:
        # One row per text encoder, under the keys A1111 and ComfyUI read for SDXL.
        first, second = artifact.handle_vector_sets
        return {SDXL_CLIP_L_KEY: first[index].float()[None], SDXL_CLIP_G_KEY: second[index].float()[None]}

    def diffusers_embeddings(self, artifact: Artifact) -> dict[str, torch.Tensor]:
        # ``{"clip_l": (K, d1), "clip_g": (K, d2)}``, rows in handle order: one
        # ``load_textual_inversion(rows, token=handles, text_encoder=..., tokenizer=...)`` per encoder,
        # the way diffusers' documentation loads SDXL embeddings.
        first, second = artifact.handle_vector_sets
        return {SDXL_CLIP_L_KEY: first.float(), SDXL_CLIP_G_KEY: second.float()}


# By the number of text encoders the artifact holds handle rows for.
LAYOUTS: dict[int, ExportLayout] = {1: ExportLayout(), 2: SDXLExportLayout()}


def export_layout(artifact: Artifact) -> ExportLayout:
    """The layout of ``artifact``'s family."""
    return LAYOUTS[len(artifact.handle_vector_sets)]


def layout_of_lora_file(header: dict[str, Any], metadata: dict[str, str]) -> ExportLayout:
    """The layout whose names a LoRA file (kohya's, diffusers', an artifact) uses, from its header:
    the layouts of more text encoders are asked first, the plain one answers for the rest."""
    return next(layout for _, layout in sorted(LAYOUTS.items(), reverse=True) if layout.names_a_file(header, metadata))


def sdxl_unet_config(artifact: Artifact, paths: list[str]) -> dict[str, Any]:
    """The UNet config whose SGM block numbers name the artifact's UNet LoRA modules ``paths``.

    The artifact names its base model but does not carry its UNet config. Every SDXL model lowmcgm
    loads (base or fine-tune; folder, hub id or single file) has SDXL base's UNet layout, shipped
    in ``models/configs``; the tiny test model is rebuilt from its name. A layout is taken only when
    its transformer blocks are exactly those the LoRA covers (lowmcgm's targets sit in every
    transformer block), so a UNet laid out otherwise is refused rather than named wrongly.
    """
    from lowmcgm.models.configs import config_folder
    from lowmcgm.models.tiny import TINY_NAMES, build_tiny_base

    base_model = str(artifact.meta.get("base_model", ""))
    layouts = [json.loads((config_folder(SDXL_CONFIG) / "unet" / "config.json").read_text())]
    if base_model in TINY_NAMES:
        layouts.insert(0, dict(build_tiny_base(base_model).unet.config))
    blocks = collect_attention_blocks(paths)
    for unet_config in layouts:
        if set(build_sgm_attention_blocks(unet_config)) == blocks:
            return unet_config
    raise UserError(f"Cannot give the artifact's UNet LoRA kohya's SDXL names: its base model '{base_model}' is not "
                    f"laid out as SDXL base's UNet ({len(blocks)} transformer blocks), whose block numbers those names "
                    "use; export --format diffusers or embeddings instead.")
