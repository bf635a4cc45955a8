"""kohya's names for SDXL LoRA modules, from the diffusers module paths lowmcgm trains with PEFT.

For SD 1.x/2.x kohya keeps diffusers' UNet paths (``lora_unet_down_blocks_0_attentions_0_...``,
see ``formats``). For SDXL it does not: kohya's sd-scripts trains SDXL on its own copy of the
original SGM UNet (``library/sdxl_original_unet.py``, ``SdxlUNet2DConditionModel``), so its
``networks/lora.py`` (``LoRANetwork.create_modules``: ``prefix + "." + name + "." + child_name``,
dots to underscores) writes the SGM block names::

    down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q
    -> lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q

and its two CLIP encoders (transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``, which
kept the ``text_model`` wrapper in the transformers it pins) under ``lora_te1_`` / ``lora_te2_``::

    encoder.layers.0.self_attn.q_proj -> lora_te1_text_model_encoder_layers_0_self_attn_q_proj

Inside a transformer the SGM and diffusers child names agree (``proj_in``,
``transformer_blocks.N.attn1.to_out.0``, ``ff.net.0.proj``, ``ff.net.2``); only the block prefix
changes. kohya's diffusers-to-SGM table (``library/sdxl_model_util.py``,
``make_unet_conversion_map``) hard-codes SDXL's layout: three levels of two layers, so
``down_blocks.i.attentions.j`` is ``input_blocks.{3i+j+1}.1`` and ``up_blocks.i.attentions.j`` is
``output_blocks.{3i+j}.1``. Here the indices come from the UNet config instead, following the
layout of SGM's ``UNetModel`` that the table encodes (``input_blocks.0`` is conv_in, each level
then has its layers and, except the last, a downsampler; each up level has layers + 1, the
upsampler sharing the level's last block), so SDXL-shaped test models with other level counts or
``layers_per_block`` map too. That is also what diffusers' reader assumes when it maps the names
back (``loaders/lora_conversion_utils.py``, ``_maybe_map_sgm_blocks_to_diffusers``, which divides
the block index by ``unet_config.layers_per_block + 1``), and ComfyUI maps ``lora_unet_`` plus
any SGM key of the loaded model (``comfy/lora.py``, ``model_lora_keys_unet``).

Only modules inside transformer blocks have names here: they are what kohya's LoRA targets by
default (``UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]``) and what lowmcgm trains. Writing
files (tensors, metadata) stays with ``export``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from lowmcgm.errors import UserError
from lowmcgm.interop.formats import KOHYA_UNET_PREFIX, strip_text_model

# kohya's LoRANetwork.LORA_PREFIX_TEXT_ENCODER1/2 ("lora_te1"/"lora_te2") plus the ``text_model``
# wrapper its pinned transformers (4.x) still has on both SDXL encoders; A1111's and ComfyUI's SDXL
# maps read exactly ``lora_te1_text_model_encoder_layers_*`` / ``lora_te2_text_model_encoder_layers_*``.
KOHYA_SDXL_TE_PREFIXES = {1: "lora_te1_text_model_", 2: "lora_te2_text_model_"}

_ATTENTION_BLOCK = re.compile(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.attentions\.\d+(?=\.)")


def build_sgm_attention_blocks(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """Each transformer block's diffusers path and its SGM (kohya SDXL) path.

    Args:
        unet_config: a diffusers ``UNet2DConditionModel`` config (``unet.config``): reads
            ``down_block_types``, ``up_block_types``, ``mid_block_type`` and ``layers_per_block``
            (an int, or one per level as diffusers allows).

    Returns:
        ``{"down_blocks.1.attentions.0": "input_blocks.4.1", ..., "mid_block.attentions.0":
        "middle_block.1", "up_blocks.0.attentions.0": "output_blocks.0.1", ...}`` (SDXL's values).
    """
    down_types = list(unet_config["down_block_types"])
    levels = len(down_types)
    per_level = unet_config["layers_per_block"]
    layers = [per_level] * levels if isinstance(per_level, int) else list(per_level)
    blocks: dict[str, str] = {}
    index = 1  # input_blocks.0 is conv_in
    for level, block_type in enumerate(down_types):
        for j in range(layers[level]):
            if "CrossAttn" in block_type:
                blocks[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"  # .0 is the resnet
            index += 1
        index += 1 if level < levels - 1 else 0  # the downsampler's own block
    if "CrossAttn" in (unet_config["mid_block_type"] or ""):
        blocks["mid_block.attentions.0"] = "middle_block.1"  # between its two resnets
    index = 0
    for level, block_type in enumerate(unet_config["up_block_types"]):
        for j in range(layers[levels - 1 - level] + 1):  # diffusers: reversed layers_per_block + 1
            if "CrossAttn" in block_type:
                blocks[f"up_blocks.{level}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
    return blocks


def collect_attention_blocks(paths: Iterable[str]) -> set[str]:
    """The transformer blocks that hold the UNet modules ``paths``.

    Args:
        paths: diffusers UNet module paths, e.g. ``down_blocks.1.attentions.0.proj_in``.

    Returns:
        e.g. ``{"down_blocks.1.attentions.0", "mid_block.attentions.0"}``; paths outside any
        transformer block (a resnet, say) add nothing.
    """
    return {match.group(0) for match in map(_ATTENTION_BLOCK.match, paths) if match}


def kohya_sdxl_unet_stem(path: str, unet_config: Mapping[str, Any]) -> str:
    """kohya's SDXL LoRA name for a UNet module, without ``.lora_down.weight`` etc.

    Args:
        path: the module's path in the diffusers UNet, as PEFT names it,
            e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.
        unet_config: the UNet's config (see ``build_sgm_attention_blocks``).

    Returns:
        e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` for SDXL base.

    Raises:
        UserError: the module is outside the UNet's transformer blocks (a resnet, say), which
            lowmcgm's kohya SDXL names do not cover.
    """
    match = _ATTENTION_BLOCK.match(path)
    sgm = build_sgm_attention_blocks(unet_config).get(match.group(0)) if match else None
    if sgm is None:
        raise UserError(f"No kohya SDXL name for UNet module {path}: only modules inside transformer "
                        "blocks get one; keep lora.unet_targets to attention and feed-forward layers.")
    return KOHYA_UNET_PREFIX + (sgm + path[match.end():]).replace(".", "_")


def kohya_sdxl_text_encoder_stem(path: str, encoder: int) -> str:
    """kohya's SDXL LoRA name for a module of text encoder 1 (CLIP ViT-L) or 2 (OpenCLIP ViT-bigG).

    Args:
        path: the module's path in the transformers encoder, with or without the ``text_model.``
            wrapper (transformers >= 5.10 drops it from ``CLIPTextModel`` only),
            e.g. ``encoder.layers.0.self_attn.q_proj``.
        encoder: 1 for ``text_encoder``, 2 for ``text_encoder_2``.

    Returns:
        e.g. ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``.
    """
    assert encoder in KOHYA_SDXL_TE_PREFIXES, encoder
    return KOHYA_SDXL_TE_PREFIXES[encoder] + strip_text_model(path).replace(".", "_")
