"""Peak GPU memory of sampling, per pose-guidance mode, traced on fake CUDA tensors (no GPU).

One denoising step as ``PoseSampler.generate`` runs it (classifier-free guidance: a batch of two),
with lowmcgm's own guidance code: ``none``, ``attention`` (the biasing processor on every
cross-attention layer) or ``latent`` (a conditional UNet pass with attention capture on the loss
layers and a backward to the latent, then the step), followed by the VAE decode of one image,
which is where plain sampling usually peaks. Weights in ``dtype`` (fp16 as on a GPU), random.

    from lowmcgm.memory.sampling import estimate_sampling
    figures = estimate_sampling("sd15", resolution=512, mode="latent")
"""

from __future__ import annotations

from typing import Any

from lowmcgm.memory import trace as mt

MODES = ("none", "attention", "latent")


def estimate_sampling(model: str = "sd15", resolution: int = 512, mode: str = "none", dtype: str = "fp16",
                      timeout_s: float = 600.0) -> dict[str, Any]:
    """Trace one guided denoising step and one VAE decode; return their peaks in bytes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    return mt.run_traced("lowmcgm.memory.sampling:sampling_step",
                         {"model": model, "resolution": resolution, "mode": mode, "dtype": dtype}, timeout_s)


def sampling_step(model: str, resolution: int, mode: str, dtype: str) -> dict[str, Any]:
    """Traced: build the UNet and VAE of ``model`` and run one step of ``mode`` and one decode."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lowmcgm.attention_capture import CrossAttentionStore, install_capture, loss_layer_names
    from lowmcgm.dtypes import torch_dtype
    from lowmcgm.model_configs import SHIPPED_CONFIGS
    from lowmcgm.pose_guidance import DEFAULT_STRENGTH, LatentGuidance, PoseGuide, guided_attention

    s = mt.session()
    s.set_item_value(1)
    weight_dtype = torch_dtype(dtype)
    folder = SHIPPED_CONFIGS[model]
    unet = mt.build_from_config(UNet2DConditionModel, folder / "unet")
    vae = mt.build_from_config(AutoencoderKL, folder / "vae")
    for module in (unet, vae):
        module.requires_grad_(False).eval()
        s.materialize(module, lambda name, param: weight_dtype)
    weights = s.counter.current
    latent_px = resolution // 8
    width = unet.config.cross_attention_dim
    tokens = 77 + 1  # one handle with its mask token
    latents = torch.randn(1, unet.config.in_channels, latent_px, latent_px, device=s.device, dtype=weight_dtype)
    cond = torch.randn(1, tokens, width, device=s.device, dtype=weight_dtype)
    context = torch.cat([torch.zeros_like(cond), cond])  # (2, 78, d): unconditional first
    t = torch.tensor([500], device=s.device)
    masks = torch.zeros(2, resolution, resolution)
    masks[:, resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = 1
    guide = PoseGuide([5, 77], masks, DEFAULT_STRENGTH.get(mode, 1.0), steps=10, uncond_rows=1)

    s.reset_peak()
    with torch.no_grad():
        if mode == "latent":
            store = CrossAttentionStore()
            install_capture(unet, loss_layer_names(unet, 0, latent_px), store)
            latents = LatentGuidance(unet, store, cond, guide).step(latents, t, lambda x, _: x)
        if mode == "attention":
            with guided_attention(unet, guide):
                unet(torch.cat([latents] * 2), t, context)
        else:
            unet(torch.cat([latents] * 2), t, context)
    step_peak = s.counter.peak - weights
    s.reset_peak()
    with torch.no_grad():
        vae.decode(latents / vae.config.scaling_factor)
    decode_peak = s.counter.peak - weights
    return {"model": model, "resolution": resolution, "mode": mode, "dtype": dtype, "weights_bytes": weights,
            "step_peak_bytes": step_peak, "decode_peak_bytes": decode_peak,
            "peak_bytes": weights + max(step_peak, decode_peak)}
