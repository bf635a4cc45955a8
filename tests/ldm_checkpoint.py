"""Writing SD 1.x models in the original (ldm/CompVis) single-file key layout, for loader tests.

The inverse of what diffusers' single-file loader does, after the tables of diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py``: the loader under test reads these
files with diffusers' own conversion, and a wrong name here leaves a key it does not find.
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."


def _unet_renames() -> list[tuple[str, str]]:
    """(diffusers prefix, ldm prefix) pairs of an SD 1.x/2.x UNet (4 levels, 2 resnets each)."""
    renames = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
               ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
               ("mid_block.attentions.0.", "middle_block.1.")]
    renames += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    for i in range(4):
        for j in range(2):
            renames.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            if i < 3:
                renames.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(3):
            renames.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            if i > 0:
                renames.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        if i < 3:
            renames.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
            renames.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."))
    return renames


UNET_RESNET_PARTS = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                     ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
                     ("conv_shortcut.", "skip_connection.")]


def _vae_renames() -> list[tuple[str, str]]:
    renames = [("mid_block.attentions.0.", "mid.attn_1."), ("conv_norm_out.", "norm_out.")]
    renames += [(f"mid_block.resnets.{j}.", f"mid.block_{j + 1}.") for j in range(2)]
    for i in range(4):
        renames += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(2)]
        renames += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.") for j in range(3)]
        if i < 3:
            renames.append((f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."))
            renames.append((f"up_blocks.{i}.upsamplers.0.", f"up.{3 - i}.upsample."))
    return renames


VAE_ATTENTION_PARTS = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                       ("to_out.0.", "proj_out.")]


def _rename(key: str, renames: list[tuple[str, str]]) -> str:
    for old, new in renames:
        if old in key:
            key = key.replace(old, new)
    return key


def unet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = _unet_renames()
    out = {}
    for key, value in state.items():
        if ".resnets." in key:
            key = _rename(key, UNET_RESNET_PARTS)
        out[UNET_PREFIX + _rename(key, renames)] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renames = _vae_renames()
    out = {}
    for key, value in state.items():
        if ".resnets." in key:
            key = key.replace("conv_shortcut.", "nin_shortcut.")
        if ".attentions." in key:
            key = _rename(key, VAE_ATTENTION_PARTS)
            if value.ndim == 2:
                value = value[:, :, None, None]  # ldm's VAE attention uses 1x1 convolutions
        out[VAE_PREFIX + _rename(key, renames)] = value
    return out


def sd1_text_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers 5 drops the ``text_model.`` level from CLIPTextModel's keys; ldm files have it.
    return {SD1_TEXT_PREFIX + ("" if key.startswith("text_model.") else "text_model.") + key: value
            for key, value in state.items()}


def build_ldm_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One SD 1.x single-file state dict, in ``dtype``, from the three diffusers/transformers models."""
    state = unet_to_ldm(unet.state_dict()) | vae_to_ldm(vae.state_dict()) | sd1_text_to_ldm(text_encoder.state_dict())
    return {key: value.to(dtype).contiguous() for key, value in state.items()}
