"""What sampling writes beside each image: its PNG text chunks (everything needed to draw it again,
and A1111's ``parameters`` line other tools read), the images' names, the contact sheet and
``samples.json``; and reading the chunks back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Protocol

from PIL import Image

from lowmcgm import __version__
from lowmcgm.config import SampleSettings
from lowmcgm.errors import UserError
from lowmcgm.runs.folder import SAMPLE_FILES
from lowmcgm.sampling.pipeline import SCHEDULERS
from lowmcgm.sampling.previews import SheetRow, mask_to_image, render_contact_sheet, save_json, save_png
from lowmcgm.sampling.prompts import PlannedPrompt, fit_pose_masks

ProgressFn = Callable[[dict[str, Any]], None]


class ImageSource(Protocol):
    """What ``write_samples`` draws with: a ``sampler.PoseSampler``."""

    mask_encoder: Any  # None when the artifact has no mask tokens

    def generate(self, plan: PlannedPrompt, seeds: list[int], settings: SampleSettings) -> list[Image.Image]: ...


def png_parameters(plan: PlannedPrompt, settings: SampleSettings, seed: int, info: dict[str, str]) -> dict[str, str]:
    """The PNG text chunks of one image: everything needed to draw it again."""
    label = SCHEDULERS[settings.scheduler][0]
    text = {
        "prompt": plan.text, "negative_prompt": settings.negative_prompt, "seed": str(seed),
        "steps": str(settings.steps), "guidance_scale": repr(float(settings.guidance_scale)),
        "scheduler": settings.scheduler, "width": str(settings.width), "height": str(settings.height),
        "dtype": settings.dtype, "mask_tokens": "on" if plan.use_mask_tokens else "off",
        "poses": json.dumps(plan.poses), "pose_guidance": settings.pose_guidance,
        "pose_guidance_strength": repr(float(settings.pose_guidance_strength)),
        "pose_guidance_steps": str(settings.pose_guidance_steps),
        "pose_guidance_options": json.dumps(guidance_options(settings)), "lowmcgm_version": __version__, **info,
    }
    # A1111's layout, which image viewers and web UIs read.
    text["parameters"] = (f"{plan.text}\nNegative prompt: {settings.negative_prompt}\nSteps: {settings.steps}, "
                          f"Sampler: {label}, CFG scale: {settings.guidance_scale}, Seed: {seed}, "
                          f"Size: {settings.width}x{settings.height}, "
                          f"lowmcgm artifact: {info.get('artifact_sha256', '')[:12]}")
    return text


_INT_CHUNKS = ("seed", "steps", "width", "height", "pose_guidance_steps")


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """Read back what ``png_parameters`` wrote (numbers as numbers, poses as a dict)."""
    try:
        with Image.open(path) as image:
            text = dict(image.text)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable PNG.") from exc
    out: dict[str, Any] = dict(text)
    for key in _INT_CHUNKS:
        if key in out:
            out[key] = int(out[key])
    for key in ("guidance_scale", "pose_guidance_strength"):
        if key in out:
            out[key] = float(out[key])
    for key in ("poses", "pose_guidance_options"):
        if key in out:
            out[key] = json.loads(out[key])
    return out


def guidance_options(settings: SampleSettings) -> dict[str, Any]:
    """How the pose guidance mode guided (``[sample]``'s other ``pose_guidance_*`` fields), by the
    field's name without its prefix."""
    said = {"pose_guidance", "pose_guidance_strength", "pose_guidance_steps"}
    return {f.name.removeprefix("pose_guidance_"): getattr(settings, f.name) for f in dataclasses.fields(settings)
            if f.name.startswith("pose_guidance_") and f.name not in said}


def write_samples(sampler: ImageSource, plans: list[PlannedPrompt], settings: SampleSettings, out: Path,
                  info: dict[str, str], report: ProgressFn | None = None) -> Path:
    """Draw every prompt's images into ``out`` with their parameters, then grid.png and samples.json.

    Args:
        settings: resolved (height, width and dtype set).
        info: artifact path and hash, base model name: written into every PNG and the index.

    Returns:
        The path of ``grid.png``.
    """
    report = report or (lambda event: None)
    total, done = len(plans) * settings.num_images, 0
    rows, entries = [], []
    for p, plan in enumerate(plans):
        row = SheetRow(title=plan.text + ("" if plan.use_mask_tokens else "  (no mask tokens)"))
        if (plan.use_mask_tokens and sampler.mask_encoder is not None) or plan.poses:
            fitted = fit_pose_masks(plan, settings.height, settings.width).numpy()
            row.poses = [(f"{h}: {Path(f).name if f else 'blank'}", mask_to_image(m, (settings.width, settings.height)))
                         for h, f, m in zip(plan.handles, plan.pose_files, fitted)]
        images = []
        for start in range(0, settings.num_images, settings.batch_size):
            seeds = [settings.seed + i for i in range(start, min(start + settings.batch_size, settings.num_images))]
            for seed, image in zip(seeds, sampler.generate(plan, seeds, settings)):
                name = _image_name(p, seed, settings)
                save_png(image, out / name, png_parameters(plan, settings, seed, info))
                images.append({"file": name, "seed": seed})
                row.images.append((f"seed {seed}", image))
                done += 1
                report({"kind": "saved", "what": f"image {done}/{total}", "path": str(out / name)})
        rows.append(row)
        entries.append({"prompt": plan.text, "handles": plan.handles, "poses": plan.poses,
                        "mask_tokens": plan.use_mask_tokens, "images": images})
    grid = save_png(render_contact_sheet(rows), out / "grid.png")
    save_json({**info, "lowmcgm_version": __version__, "settings": dataclasses.asdict(settings),
               "grid": grid.name, "prompts": entries}, out / "samples.json")
    report({"kind": "saved", "what": "contact sheet", "path": str(grid)})
    return grid


def _image_name(prompt_index: int, seed: int, settings: SampleSettings) -> str:
    return f"p{prompt_index:02d}-{seed - settings.seed:03d}-seed{seed}.png"  # run_folder.SAMPLE_IMAGE


def sample_files(plans: list[PlannedPrompt], settings: SampleSettings, out: Path) -> list[Path]:
    """Every file ``write_samples`` writes into ``out``."""
    names = [_image_name(p, settings.seed + i, settings) for p in range(len(plans)) for i in range(settings.num_images)]
    return [out / name for name in [*names, *SAMPLE_FILES]]
