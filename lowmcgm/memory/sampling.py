"""Peak GPU memory of sampling, per pose-guidance mode, traced on fake CUDA tensors (no GPU).

One denoising step as ``PoseSampler.generate`` runs it (classifier-free guidance: a batch of two),
with lowmcgm's own guidance code: ``none``, ``attention`` (the biasing processor on every
cross-attention layer) or ``latent`` (a conditional UNet pass with attention capture on the loss
layers and a backward to the latent, then the step), followed by the VAE decode of one image,
which is where plain sampling usually peaks. Weights in ``dtype`` (fp16 as on a GPU), random.

SDXL (``sdxl-base``) as lowmcgm runs it: both text encoders on the GPU only while they encode a
prompt (``sampler.PoseSampler``; their bytes are the ``text_encoders_bytes`` figure, on top of the
weights then), the pooled embedding and size numbers beside the context, and the VAE cast up to fp32
for the decode (diffusers does so for a VAE whose config says ``force_upcast``: SDXL's overflows in
fp16). ``fp8_unet`` stores the UNet's weights in fp8, as sampling an artifact trained with
``model.fp8_base`` does.

    from lowmcgm.memory.sampling import estimate_sampling
    figures = estimate_sampling("sd15", resolution=512, mode="latent")
"""

from __future__ import annotations

from typing import Any

from lowmcgm.memory import trace as mt

MODES = ("none", "attention", "latent")


def estimate_sampling(model: str = "sd15", resolution: int = 512, mode: str = "none", dtype: str = "fp16",
                      timeout_s: float = 600.0, fp8_unet: bool = False,
                      guidance_checkpointing: bool | None = None) -> dict[str, Any]:
    """Trace one guided denoising step and one VAE decode; return their peaks in bytes.

    ``guidance_checkpointing``: latent guidance's pass with gradient checkpointing or not; None: as
    ``PoseSampler`` runs it, the model family's choice (``ModelFamily.guidance_checkpointing``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    return mt.run_traced("lowmcgm.memory.sampling:sampling_step",
                         {"model": model, "resolution": resolution, "mode": mode, "dtype": dtype,
                          "fp8_unet": fp8_unet, "guidance_checkpointing": guidance_checkpointing}, timeout_s)


def sampling_step(model: str, resolution: int, mode: str, dtype: str, fp8_unet: bool = False,
                  guidance_checkpointing: bool | None = None) -> dict[str, Any]:
    """Traced: build the UNet, VAE (and SDXL's text encoders) of ``model`` and run one step of
    ``mode`` and one decode."""
    import gc

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from lowmcgm.adapters import store_in_fp8
    from lowmcgm.config import SampleSettings
    from lowmcgm.models.configs import SHIPPED_CONFIGS
    from lowmcgm.models.dtypes import torch_dtype
    from lowmcgm.models.families import detect_family
    from lowmcgm.sampling.latent_guidance import LatentGuidance, guidance_layers
    from lowmcgm.sampling.pose_guidance import DEFAULT_STRENGTH, PoseGuide, guidance_rule, guided_attention

    s = mt.session()
    s.set_item_value(1)
    weight_dtype = torch_dtype(dtype)
    folder = SHIPPED_CONFIGS[model]
    unet = mt.build_from_config(UNet2DConditionModel, folder / "unet")
    vae = mt.build_from_config(AutoencoderKL, folder / "vae")
    for module in (unet, vae):
        module.requires_grad_(False).eval()
        s.materialize(module, lambda name, param: weight_dtype)
    if fp8_unet:
        store_in_fp8(unet, weight_dtype)
    if guidance_checkpointing is None:
        family = detect_family(unet.config, (folder / "text_encoder_2").is_dir())
        guidance_checkpointing = family.guidance_checkpointing
    weights = s.counter.current
    encoders = _visiting_text_encoders(folder)
    for module in encoders:  # measured, then gone: they leave the GPU once the prompt is encoded
        s.materialize(module, lambda name, param: weight_dtype)
    text_encoders = s.counter.current - weights
    del encoders, module
    gc.collect()
    latent_px = resolution // 8
    width = unet.config.cross_attention_dim
    tokens = 77 + 1  # one handle with its mask token
    latents = torch.randn(1, unet.config.in_channels, latent_px, latent_px, device=s.device, dtype=weight_dtype)
    cond = torch.randn(1, tokens, width, device=s.device, dtype=weight_dtype)
    context = torch.cat([torch.zeros_like(cond), cond])  # (2, 78, d): unconditional first
    added, cond_added = _added_cond_kwargs(unet, resolution, s.device, weight_dtype)
    t = torch.tensor([500], device=s.device)
    masks = torch.zeros(2, resolution, resolution)
    masks[:, resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = 1
    settings = SampleSettings(pose_guidance=mode) if mode in ("attention", "latent") else SampleSettings()
    guide = PoseGuide([5, 77], masks, DEFAULT_STRENGTH.get(guidance_rule(settings), 1.0), steps=10, uncond_rows=1,
                      bias_rule=settings.pose_guidance_bias)

    s.reset_peak()
    with torch.no_grad():
        if mode == "latent":
            guidance = LatentGuidance(unet, guidance_layers(unet, settings.pose_guidance_layers), cond, guide,
                                      settings, cond_added, checkpointing=guidance_checkpointing)
            latents = guidance.step(latents, 500, DDIMScheduler())  # a plain int: the noise-scaled rule reads it
        if mode == "attention":
            with guided_attention(unet, guide):
                unet(torch.cat([latents] * 2), t, context, added_cond_kwargs=added)
        else:
            unet(torch.cat([latents] * 2), t, context, added_cond_kwargs=added)
    step_peak = s.counter.peak - weights
    s.reset_peak()
    with torch.no_grad():
        if getattr(vae.config, "force_upcast", False) and added is not None:  # SDXL's pipeline: fp32 decode
            vae.to(torch.float32)
            latents = latents.float()
        vae.decode(latents / vae.config.scaling_factor)
    decode_peak = s.counter.peak - weights
    return {"model": model, "resolution": resolution, "mode": mode, "dtype": dtype, "fp8_unet": fp8_unet,
            "guidance_checkpointing": guidance_checkpointing,
            "weights_bytes": weights, "text_encoders_bytes": text_encoders, "step_peak_bytes": step_peak,
            "decode_peak_bytes": decode_peak, "peak_bytes": weights + max(step_peak, decode_peak, text_encoders)}


def _visiting_text_encoders(folder: Any) -> list[Any]:
    """SDXL's two text encoders, on the GPU while they encode; none for SD 1.x/2.x, whose text
    encoder the figures have always left out (0.25-0.7 GiB, off the GPU with ``--cpu-offload``)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if not (folder / "text_encoder_2").is_dir():
        return []
    return [mt.build_from_config(CLIPTextModel, folder / "text_encoder"),
            mt.build_from_config(CLIPTextModelWithProjection, folder / "text_encoder_2")]


def _added_cond_kwargs(unet: Any, resolution: int, device: Any, dtype: Any) -> tuple[dict | None, dict | None]:
    """SDXL's pooled embedding and size numbers for both branches and for the conditional row alone;
    (None, None) for a UNet without them."""
    import torch

    if unet.config.addition_embed_type != "text_time":
        return None, None
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2, device=device, dtype=dtype)
    both = {"text_embeds": torch.randn(2, pooled, device=device, dtype=dtype), "time_ids": time_ids}
    return both, {key: value[1:] for key, value in both.items()}
