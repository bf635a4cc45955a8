"""Prior-preservation class images: read from a folder, or generated once with the base model.

Generated images are cached in ``<out>/class_images`` (or ``train.class_images_dir`` when set), so
a resumed or repeated run does not generate them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from lowmcgm.config import Config
from lowmcgm.data import load_image, resize_crop
from lowmcgm.models.base import BaseModel
from lowmcgm.sampling.previews import save_png

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _listed(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


@torch.no_grad()
def generate_class_images(base: BaseModel, prompt: str, count: int, folder: Path, size_px: int,
                          seed: int, report: Callable[[dict[str, Any]], None]) -> None:
    """Sample ``count`` images of ``prompt`` with the base model into ``folder``."""
    from diffusers import DDIMScheduler

    folder.mkdir(parents=True, exist_ok=True)
    have = len(_listed(folder))
    report({"kind": "message", "level": "info",
            "text": f"Generating {count - have} class images of '{prompt}' into {folder} (once)."})
    pipe = base.family.build_pipeline(base, DDIMScheduler.from_config(base.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    device = next(base.unet.parameters()).device
    for i in range(have, count):
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        image = pipe(prompt, height=size_px, width=size_px, num_inference_steps=25,
                     generator=generator).images[0]
        save_png(image, folder / f"class_{i:05d}.png")
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def load_prior_latents(cfg: Config, base: BaseModel, out: Path, device: torch.device,
                       report: Callable[[dict[str, Any]], None]) -> torch.Tensor:
    """Encode the class images once; returns (M, C, h, w) posterior means on the CPU."""
    t = cfg.train
    size_px = cfg.model.resolution or base.resolution
    folder = Path(t.class_images_dir) if t.class_images_dir else out / "class_images"
    if len(_listed(folder)) < t.num_class_images:
        generate_class_images(base, t.class_prompt, t.num_class_images, folder, size_px, t.seed, report)
    latents = []
    dtype = next(base.vae.parameters()).dtype
    for path in _listed(folder)[: t.num_class_images]:
        image = resize_crop(load_image(path), size_px, Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        latents.append(base.vae.encode(pixels[None].to(device, dtype)).latent_dist.mean.float().cpu())
    return torch.cat(latents)
