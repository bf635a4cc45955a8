"""The trainer's preview hook for ``lowmcgm run``: one image and its attention picture every
``output.preview_every`` steps, drawn from the live training state."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lowmcgm.config import SampleSettings
from lowmcgm.sampling.pipeline import base_modules, build_pipeline
from lowmcgm.sampling.previews import render_attention_picture, save_png
from lowmcgm.sampling.prompts import PlannedPrompt
from lowmcgm.sampling.records import png_parameters
from lowmcgm.sampling.sampler import PoseSampler
from lowmcgm.training.state import Setup, TrainState


class TrainingPreviews:
    """The trainer's ``on_preview`` hook: a fixed-seed sample and its attention picture.

    Files go to ``folder`` as ``step00010.png`` and ``step00010-attention.png``, numbered by the
    step counted over both phases. Sampling reuses the live models (handle wrapper, adapters,
    capture processors): nothing is copied, and the training RNG is untouched (the sample draws
    from its own generator).

    Args:
        folder: ``<out>/previews``.
        plan: the prompt to draw (``run``'s first).
        settings: sampling settings; the image is drawn at the training resolution.
        phase1_steps: to number phase 2 steps after phase 1's.
    """

    def __init__(self, folder: Path, plan: PlannedPrompt, settings: SampleSettings, phase1_steps: int):
        self.folder = Path(folder)
        self.plan = plan
        self.settings = settings
        self.phase1_steps = phase1_steps

    def __call__(self, setup: Setup, state: TrainState) -> None:
        base = setup.base
        step = state.step + (self.phase1_steps if state.phase == 2 else 0)
        size = int(setup.concept.image.shape[-1])
        precision = setup.accelerator.mixed_precision
        settings = dataclasses.replace(self.settings, height=size, width=size, num_images=1,
                                       dtype="fp32" if precision == "no" else precision)
        sampler = PoseSampler(build_pipeline(base, settings.scheduler), setup.mcgm.mask_encoder, base, setup.device,
                              autocast=setup.accelerator.autocast, store=setup.store)
        # The trainer may have moved the VAE (photo encoded) and the text encoder(s) (phase 2 trains
        # nothing in them) off the GPU; sampling needs them there for a moment.
        places = [(m, next(m.parameters()).device, m.training) for m in base_modules(base)]
        for module, _, _ in places:
            module.to(setup.device)
            module.eval()
        try:
            image, maps = sampler.generate_with_attention(self.plan, settings.seed, settings)
        finally:
            for module, device, training in places:  # the hook leaves the models as it found them
                module.to(device)
                module.train(training)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"phase": str(state.phase), "train_step": str(step),
                **png_parameters(self.plan, settings, settings.seed, {})}
        save_png(image, self.folder / f"step{step:05d}.png", meta)
        title = f"step {step} (phase {state.phase}): {self.plan.text}"
        save_png(render_attention_picture(image, maps, title), self.folder / f"step{step:05d}-attention.png", meta)
