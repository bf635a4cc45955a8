"""Names and layouts of the LoRA and embedding files other Stable Diffusion tools read.

Shared by ``export`` (writing them) and ``lora_import`` (reading them back). What each tool
reads is in docs/interop.md ("Using your subjects in A1111, ComfyUI, kohya and diffusers"); kohya keys are written by lowmcgm itself
because diffusers' ``convert_state_dict_to_kohya`` stores alpha = rank and names text-encoder keys
``lora_te1_encoder_layers_*`` under transformers >= 5.10, which A1111 does not match.
"""

from __future__ import annotations

import torch

from lowmcgm.errors import UserError

KOHYA_UNET_PREFIX = "lora_unet_"
# kohya, A1111 and ComfyUI name SD 1.x/2.x text-encoder modules after the transformers layout that
# still had the ``text_model`` wrapper, whatever transformers version wrote the weights.
KOHYA_TE_PREFIX = "lora_te_text_model_"
BUNDLE_PREFIX = "bundle_emb."
A1111_EMBEDDING_KEY = "string_to_param.*"
# SDXL embeddings hold one row per text encoder under these keys: A1111 (textual_inversion.py,
# create_embedding_from_data: "SDXL embedding"), ComfyUI (its SDXL tokenizers' embedding_key) and the
# bundled ``bundle_emb.<name>.clip_l`` / ``.clip_g`` of a LoRA (A1111's networks.py) all read them.
SDXL_CLIP_L_KEY = "clip_l"  # text_encoder: CLIP ViT-L
SDXL_CLIP_G_KEY = "clip_g"  # text_encoder_2: OpenCLIP ViT-bigG
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
DIFFUSERS_EMBEDS_NAME = "learned_embeds.safetensors"  # what diffusers' textual-inversion script writes
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

# Module names lowmcgm targets by default; used to turn a file's modules into --set advice.
UNET_TARGET_NAMES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TE_TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
OTHER_ADAPTERS = ("dora_scale", "hada_", "lokr_", "lora_mid", "oft_", "lora_magnitude_vector")


def peft_modules(state: dict[str, torch.Tensor], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT ``<path>.lora_A.weight``/``lora_B.weight`` pairs -> {path: (down, up)}."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in sorted(state):
        if key.endswith(".lora_B.weight"):
            continue
        if not key.endswith(".lora_A.weight"):
            raise UserError(f"The artifact holds a LoRA tensor no other tool reads ({key}).")
        path = key[: -len(".lora_A.weight")]
        up = state.get(f"{path}.lora_B.weight")
        if up is None:
            raise UserError(f"The artifact's LoRA is incomplete: {path} has no lora_B weight.")
        modules[path] = (state[key], up)
    if len(state) != 2 * len(modules):
        raise UserError("The artifact's LoRA is incomplete: some lora_B weights have no lora_A.")
    if any(down.shape[0] != rank for down, _ in modules.values()):
        raise UserError(f"The artifact's LoRA tensors do not match its rank {rank}.")
    return modules


def strip_text_model(path: str) -> str:
    return path.removeprefix("text_model.")
