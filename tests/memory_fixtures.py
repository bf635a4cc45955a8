"""Traceable training steps the memory tests run: a tiny UNet (the self-check of fake against real
CPU figures) and a LoRA step of an SD-size UNet built from its config (the SD 1.5 smoke test).

Tests import this module by name, like ``conftest`` and ``ui_browser``; the tracing subprocess
finds it too (``run_traced`` passes this process's ``sys.path`` additions on), so its functions
are named ``"memory_fixtures:tiny_unet_step"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lowmcgm.memory.trace import build_from_config, materialize_fake, run_traced, session, storage_bytes
from lowmcgm.models.dtypes import torch_dtype

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _config_folder(name_or_path: str) -> Path:
    from lowmcgm.models.configs import SHIPPED_CONFIGS

    return SHIPPED_CONFIGS[name_or_path] if name_or_path in SHIPPED_CONFIGS else Path(name_or_path)


def _train_steps(model: torch.nn.Module, make_batch: Callable[[], tuple], steps: int,
                 compute_dtype: torch.dtype, optimizer: torch.optim.Optimizer) -> dict:
    """Forward (autocast unless fp32), MSE to the input, backward, optimizer step; with snapshots
    and the byte counts of gradients and optimizer state."""
    s = session()
    params = [p for p in model.parameters() if p.requires_grad]
    parts: dict[str, int] = {}
    for i in range(steps):
        sample, t, ctx = make_batch()
        with s.autocast(compute_dtype):
            pred = model(sample, t, ctx).sample
        loss = F.mse_loss(pred.float(), sample.float())
        s.snapshot(f"step{i}.forward")
        loss.backward()
        del pred, loss
        parts["gradient_bytes"] = storage_bytes(p.grad for p in params)
        s.snapshot(f"step{i}.backward")
        optimizer.step()
        parts["optimizer_state_bytes"] = storage_bytes(optimizer)
        s.snapshot(f"step{i}.optimizer")
        optimizer.zero_grad(set_to_none=True)
    return parts


def unet_lora_step(config_name: str = "sd15", resolution: int = 512, rank: int = 4,
                   gradient_checkpointing: bool = True, dtype: str = "fp16", steps: int = 2,
                   batch_size: int = 1, target_modules: list[str] | tuple[str, ...] = LORA_TARGETS,
                   text_tokens: int = 77, resident_encoders: bool = False) -> dict:
    """Traceable: LoRA training steps of a UNet built from a config (the memory probe's setup).

    Frozen UNet in ``dtype``, LoRA (peft ``inject_adapter_in_model``, rank ``rank``, alpha = rank)
    in fp32, autocast to ``dtype``, AdamW (torch's default implementation for the device), MSE to
    the input latents, ``steps`` steps (the second has optimizer state: steady state). With
    ``resident_encoders`` the frozen text encoder and VAE weights (in ``dtype``) are also on the
    device, idle (they are not run); otherwise the UNet is alone.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextModel

    s = session()
    weight_dtype = torch_dtype(dtype)
    folder = _config_folder(config_name)
    encoder_bytes = 0
    if resident_encoders:
        encoders = [build_from_config(CLIPTextModel, folder / "text_encoder"),
                    build_from_config(AutoencoderKL, folder / "vae")]
        for m in encoders:
            m.requires_grad_(False)
            materialize_fake(m, lambda n, p: weight_dtype)
        encoder_bytes = storage_bytes(encoders)
    unet = build_from_config(UNet2DConditionModel, folder / "unet")
    unet.requires_grad_(False)
    if rank > 0:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                           target_modules=list(target_modules)), unet)
    materialize_fake(unet, lambda n, p: torch.float32 if p.requires_grad else weight_dtype)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    parts = {"frozen_weight_bytes": storage_bytes(p for p in unet.parameters() if not p.requires_grad),
             "trainable_weight_bytes": storage_bytes(trainable),
             "trainable_params": sum(p.numel() for p in trainable),
             "params": sum(p.numel() for p in unet.parameters()),
             "encoder_weight_bytes": encoder_bytes}
    s.snapshot("weights")
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    lat = resolution // 8
    cross = unet.config.cross_attention_dim

    def batch():
        return (torch.randn(batch_size, unet.config.in_channels, lat, lat, device=s.device,
                            dtype=weight_dtype),
                torch.randint(0, 1000, (batch_size,), device=s.device),
                torch.randn(batch_size, text_tokens, cross, device=s.device, dtype=weight_dtype))

    parts.update(_train_steps(unet, batch, steps, weight_dtype, opt))
    parts["peak_bytes"] = s.counter.peak
    return parts


def trace_unet_lora_step(config_name: str = "sd15", resolution: int = 512, rank: int = 4,
                         gradient_checkpointing: bool = True, dtype: str = "fp16", *,
                         steps: int = 2, batch_size: int = 1, resident_encoders: bool = False,
                         mode: str = "auto", timeout_s: float = 600.0) -> dict:
    """Smoke test of the whole machinery: :func:`unet_lora_step` in a traced subprocess.

    On SD 1.5 at 512 px (fake CUDA, LoRA r4, fp16, AdamW, 2 steps) this gives 1.865 GiB with
    gradient checkpointing and 2.704 GiB without for the UNet alone (what the probe prints), and
    2.25 / 3.09 GiB with the fp16 CLIP-L and VAE weights resident (``resident_encoders``).

    Returns:
        :func:`run_traced`'s dict; ``["peak_bytes"]`` is the peak.
    """
    return run_traced("memory_fixtures:unet_lora_step",
                      dict(config_name=config_name, resolution=resolution, rank=rank,
                           gradient_checkpointing=gradient_checkpointing, dtype=dtype,
                           steps=steps, batch_size=batch_size,
                           resident_encoders=resident_encoders),
                      timeout_s, mode=mode)


TINY_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=32,
)


def tiny_unet_step(latent_size: int = 16, steps: int = 2, lora_rank: int = 0,
                   gradient_checkpointing: bool = False, dtype: str = "fp32",
                   batch_size: int = 1, text_tokens: int = 8, foreach: bool | None = False,
                   config: dict | None = None) -> dict:
    """Traceable: training steps of a tiny UNet2DConditionModel (block channels (32, 64), cross
    attention dim 32): the self-check that fake-CUDA figures match real CPU ones.

    ``lora_rank`` 0 trains every parameter, else LoRA on the attention projections. ``foreach``
    is passed to AdamW (False by default so CPU and CUDA take the same implementation).
    """
    from diffusers import UNet2DConditionModel

    s = session()
    weight_dtype = torch_dtype(dtype)
    cfg = dict(TINY_UNET_CONFIG, **(config or {}))
    cfg["sample_size"] = latent_size
    unet = build_from_config(UNet2DConditionModel, cfg)
    if lora_rank > 0:
        from peft import LoraConfig, inject_adapter_in_model

        unet.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank,
                                           target_modules=list(LORA_TARGETS)), unet)
    materialize_fake(unet, lambda n, p: torch.float32 if p.requires_grad else weight_dtype)
    s.snapshot("weights")
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4,
                            foreach=foreach)

    def batch():
        return (torch.randn(batch_size, 4, latent_size, latent_size, device=s.device,
                            dtype=weight_dtype),
                torch.randint(0, 1000, (batch_size,), device=s.device),
                torch.randn(batch_size, text_tokens, cfg["cross_attention_dim"], device=s.device,
                            dtype=weight_dtype))

    parts = _train_steps(unet, batch, steps, weight_dtype, opt)
    parts["params"] = sum(p.numel() for p in unet.parameters())
    parts["peak_bytes"] = s.counter.peak
    return parts
