"""The one place sampling's diffusers pipeline is built: the base's family's stock pipeline, over
the base's own modules (no copies), with the scheduler ``sample.scheduler`` names.

``sampler.build_sampler`` builds on it; training previews build the same pipeline over the live
models; prior preservation's class images use the family's pipeline too (``training.prior``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)

from lowmcgm.models.base import BaseModel

# One entry per choice of sample.scheduler (config.SampleSettings declares the names).
SCHEDULERS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    # name: (A1111's label, for the "parameters" chunk other tools read; factory from a scheduler config)
    "ddim": ("DDIM", lambda config: DDIMScheduler.from_config(config)),
    "euler_a": ("Euler a", lambda config: EulerAncestralDiscreteScheduler.from_config(config)),
    "dpmpp_2m": ("DPM++ 2M", lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2)),
}
Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline


def build_pipeline(base: BaseModel, scheduler: str) -> Pipeline:
    """The family's stock diffusers pipeline over the base's modules (no copies), with the named scheduler."""
    pipe = base.family.build_pipeline(base, SCHEDULERS[scheduler][1](base.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)  # library code never prints; callers report per image
    return pipe


def base_modules(base: BaseModel) -> list[torch.nn.Module]:
    """The modules sampling runs: UNet, text encoder(s) (SDXL has two) and VAE."""
    return [base.unet, *base.text_encoders, base.vae]
