"""The traced side of ``lowmcgm estimate``: one configuration's training, traced phase by phase.

:func:`trace_jobs` runs in the tracing subprocess (:func:`lowmcgm.memory.trace.run_traced`, which has
loaded the fake-CUDA shim before importing torch, and so this module). For each job it builds the
base model's UNet, text encoder and VAE from their config files on the meta device, hands them to
the trainer's own ``prepare_setup`` with a stand-in accelerator (:class:`TraceAccelerator`): handles
with a stand-in tokenizer, mask encoder, capture processors, checkpointing, casts and moves, the
photo encode, the VAE offload. It then drives the training recipe (``TrainingRecipe``: ``enter_phase``, ``step``)
:data:`STEPS_PER_PHASE` times per phase (the second step has optimizer state) under a probe that
follows the step and the live-bytes counter, and returns each phase's peak and its parts.
Turning the figures into an estimate, the card margin and the report are :mod:`lowmcgm.memory.estimate`'s.
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path
from typing import Any

import torch

from lowmcgm.config import Config, apply_overrides, config_from_dict
from lowmcgm.data import ConceptImage
from lowmcgm.memory import trace as mt
from lowmcgm.memory.attention_layouts import KeepAllStore, install_attention_layout
from lowmcgm.memory.step_probe import StepProbe, optimizer_state_bytes, peak_parts

# Steps traced per phase: the first creates the optimizer state, the second runs with it (steady state).
STEPS_PER_PHASE = 2


def trace_jobs(jobs: list[dict[str, Any]], stop_below_bytes: int | None = None) -> list[dict | None]:
    """Traced entry point: :func:`trace_job` for each job. With ``stop_below_bytes``, a job with a
    ``group`` is skipped once a job of its group, or an ungrouped job, peaked at or below it."""
    fitted: set[str | None] = set()  # None: an ungrouped job (the configuration itself) fitted
    out: list[dict | None] = []
    for job in jobs:
        group = job.get("group")
        if group is not None and (group in fitted or None in fitted):
            out.append(None)
            continue
        res = trace_job(**{k: v for k, v in job.items() if k not in ("group", "label")})
        out.append(res)
        peak = max(max(p["peak_bytes"], p["setup_peak_bytes"]) for p in res["phases"])
        if stop_below_bytes is not None and peak <= stop_below_bytes:
            fitted.add(group)
        gc.collect()
    return out


def trace_job(config: dict[str, Any], model: str, attention: str = "sdpa", num_concepts: int = 2) -> dict:
    """Traced: build ``model`` for ``config``, prepare it with the trainer's code and run
    :data:`STEPS_PER_PHASE` training steps of each phase that has steps; return the figures.

    Runs in a fake-CUDA session (the estimate), a real CUDA one (measurement with random weights) or
    a CPU one (the self-check on the tiny models). Figures are relative to the bytes live at the start.
    """
    s = mt.session()
    started = time.perf_counter()
    gc.collect()
    baseline = s.counter.current
    s.reset_peak()
    cfg, setup, notes = build_traced_setup(config, model, attention, num_concepts)
    # The models are built: freeze what the cyclic collector would otherwise rescan at every
    # gc.collect() below (about 1 s each for an SD-size model; milliseconds once frozen).
    gc.collect()
    gc.freeze()
    try:
        phases = _trace_phases(s, cfg, setup, baseline)
    finally:
        gc.unfreeze()
    return {"resolution": setup.concept.image.shape[-1], "phases": phases, "analytic": [], "notes": notes,
            "baseline_bytes": baseline, "wall_s": round(time.perf_counter() - started, 2)}


def build_traced_setup(config: dict[str, Any], model: str, attention: str = "sdpa",
                       num_concepts: int = 2) -> tuple[Config, Any, list[str]]:
    """Traced: build ``model`` for ``config`` and prepare it with the trainer's own ``prepare_setup``
    (a random photo, :class:`TraceAccelerator`, random class latents), then install ``attention``.

    Shared by :func:`trace_job` (memory) and :mod:`lowmcgm.memory.flops` (operations per step).

    Returns:
        The configuration as traced, the trainer's ``Setup`` and notes on what the trace changed.
    """
    from lowmcgm.handles import default_handles
    from lowmcgm.models.tiny import TINY_WORDS
    from lowmcgm.training.optimizer import ADAMW
    from lowmcgm.training.trainer import prepare_setup, resolved_notes

    s = mt.session()
    _let_fake_checks_pass(s)
    cfg = config_from_dict(config)
    notes = []
    if cfg.model.use_xformers:
        notes.append("model.use_xformers is traced as SDPA (same memory-efficient kernel family)")
    if cfg.train.optimizer == "adamw8bit" and s.device.type == "cuda":
        notes.append("bitsandbytes AdamW8bit ran under the trace: its state (uint8 moments plus an fp32 "
                     "scale per 256 values; fp32 moments for tensors under 4096 elements) is counted, "
                     "not computed by formula")
    n = num_concepts
    # Initializer words that are single tokens of the stand-in tokenizer: their rows are read on the
    # meta device as is (a random initialisation would mix meta and CPU tensors). Memory is the same.
    cfg = apply_overrides(cfg, {"model.use_xformers": False, "data.handles": [],
                                "data.init_words": list(TINY_WORDS[9:9 + n])}, "the estimate")
    base = _build_base(model, s)
    resolution = cfg.model.resolution or base.resolution
    latent = resolution // base.vae_scale_factor
    prior = torch.randn(2, base.vae.config.latent_channels, latent, latent) \
        if cfg.train.use_prior_preservation else None  # stands for the encoded class images
    acc = TraceAccelerator(s.device, "no" if s.device.type == "cpu" else cfg.model.mixed_precision)
    # The configured optimizer is traced as is (no test step: on fake CUDA it would prove nothing);
    # on the CPU of a real reference run, torch AdamW, as choose_optimizer falls back there.
    optimizer = cfg.train.optimizer if s.device.type == "cuda" else ADAMW
    setup = prepare_setup(cfg, base, _random_concept(resolution, n), default_handles(n), acc,
                          lambda event: None, lambda device: prior, optimizer)
    setup = install_attention_layout(setup, attention)
    notes += list(resolved_notes(cfg, base))
    return cfg, setup, notes


def _trace_phases(s: mt.TraceSession, cfg: Config, setup: Any, baseline: int) -> list[dict[str, Any]]:
    from lowmcgm.training.recipe import TrainingRecipe

    recipe, phases, setup_peak = TrainingRecipe(setup), [], s.counter.peak - baseline
    for phase in (1, 2):
        if (cfg.train.phase1_steps if phase == 1 else cfg.train.phase2_steps) == 0:
            continue
        if phase == 2:
            s.reset_peak()
        # As train(): phase 2's state (its adapters, its optimizer) is built while the phase-1 one
        # is still referenced (recipe.enter_phase drops it once the new one is there).
        recipe.enter_phase(phase)
        gc.collect()
        if phase == 2:
            setup_peak = s.counter.peak - baseline
        figures = _trace_steps(s, recipe, baseline)
        figures.update(phase=phase, setup_peak_bytes=setup_peak)
        phases.append(figures)
    return phases


def _let_fake_checks_pass(s: mt.TraceSession) -> None:
    """Fake tensors have no values: make ``.item()`` of one read 1, not 0, so that the trainer's
    checks (``torch.isfinite(loss)``, every handle present in its prompt) pass as they do for real."""
    s.set_item_value(1)


def _build_base(model: str, s: mt.TraceSession) -> Any:
    """The BaseModel for ``model``: the tiny ones for real (CPU, seeded), SD ones from configs on
    the meta device (fake runs) or with random weights on the CPU (real CUDA runs)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lowmcgm.models.base import BaseModel
    from lowmcgm.models.configs import SHIPPED_CONFIGS
    from lowmcgm.models.tiny import TINY_NAMES, TINY_WORDS, build_tiny_base
    from lowmcgm.models.tokenizer import build_clip_tokenizer

    if model in TINY_NAMES:
        return build_tiny_base(model)
    folder = SHIPPED_CONFIGS.get(model) or Path(model)
    kinds = [(UNet2DConditionModel, "unet"), (CLIPTextModel, "text_encoder"), (AutoencoderKL, "vae")]
    xl = (folder / "text_encoder_2").is_dir()  # SDXL: its second text encoder beside the first
    if xl:
        kinds.append((CLIPTextModelWithProjection, "text_encoder_2"))
    parts = [mt.build_from_config(cls, folder / sub) for cls, sub in kinds]
    if not s.is_fake:
        for module in parts:  # meta cannot be copied to a real device: random weights on the CPU
            mt.materialize(module, None, "cpu")
    unet, text_encoder, vae = parts[:3]
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    # A stand-in tokenizer: install_handles only grows the embedding table, so a small vocabulary
    # with the real 77-token length gives the same shapes as the model's own tokenizer.
    tokenizer = build_clip_tokenizer(list(TINY_WORDS))
    second = {"tokenizer_2": build_clip_tokenizer(list(TINY_WORDS)), "text_encoder_2": parts[3]} if xl else {}
    return BaseModel(tokenizer, text_encoder, vae, unet, scheduler, name=str(model), **second)


def _random_concept(resolution: int, n: int) -> ConceptImage:
    """A random photo and ``n`` side-by-side rectangular masks at ``resolution`` (CPU, as loaded)."""
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, resolution, resolution, generator=gen) * 2 - 1
    masks = torch.zeros(n, resolution, resolution)
    width = resolution // n
    for i in range(n):
        masks[i, resolution // 4: 3 * resolution // 4, i * width + width // 8: (i + 1) * width - width // 8] = 1
    return ConceptImage(image, masks)


class TraceAccelerator:
    """What the trainer uses of ``accelerate.Accelerator``, for traced runs.

    Inside a fake-CUDA session ``torch.cuda.is_available()`` stays False, so a real Accelerator puts
    itself on the CPU (checked: ``Accelerator(cpu=False, mixed_precision="fp16").device`` is cpu
    there). This one says CUDA and autocasts as accelerate does. Not modelled: fp16 loss scaling
    (a scalar, and an in-place unscale of the gradients: no memory). ``probe`` marks the parts of
    the step it sees begin and end.
    """

    def __init__(self, device: torch.device, mixed_precision: str):
        self.device = device
        self.mixed_precision = mixed_precision
        self.process_index = 0
        self.num_processes = 1
        self.is_main_process = True
        self.probe: StepProbe | None = None

    def autocast(self) -> Any:
        if self.probe is not None:
            self.probe.forward_begins()
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.mixed_precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.probe is not None:
            self.probe.forward_done()
        loss.backward()
        if self.probe is not None:
            self.probe.backward_done()

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return tensor  # one process

    def wait_for_everyone(self) -> None:
        return None


def _trace_steps(s: mt.TraceSession, recipe: Any, baseline: int) -> dict[str, Any]:
    """Run the recipe's ``step`` :data:`STEPS_PER_PHASE` times under a probe; return the phase's
    peak and its parts (bytes, relative to ``baseline``)."""
    setup = recipe.setup
    optimizer = recipe.state.optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    probe = StepProbe(s.counter, params)
    setup.accelerator.probe = probe
    hooks = probe.watch_optimizer(optimizer)
    gc.collect()
    s.reset_peak()
    try:
        for _ in range(STEPS_PER_PHASE):
            probe.begin_step(optimizer_state_bytes(optimizer, s.device.type))
            with probe:
                recipe.step()
            probe.enter("between steps")
            if isinstance(setup.store, KeepAllStore):
                setup.store.kept = []  # the reference's AttentionStore is reset after the step
    finally:
        for hook in hooks:
            hook.remove()
        probe.close()
        setup.accelerator.probe = None

    peak = s.counter.peak - baseline
    return {"peak_bytes": peak,
            **peak_parts(probe, peak, baseline, _device_modules(setup), params, s.device.type),
            "trainable_params": sum(p.numel() for p in params),
            "optimizer": type(optimizer).__name__,
            "peak_reserved_bytes": s.counter.report().get("peak_reserved_bytes")}


def _device_modules(setup: Any) -> list[torch.nn.Module]:
    base, mcgm = setup.base, setup.mcgm
    mods = [base.unet, *base.text_encoders, base.vae, *mcgm.handle_sets]
    mods = [m for m in mods if m is not None]
    return mods + ([setup.mcgm.mask_encoder] if setup.mcgm.mask_encoder is not None else [])

