"""GPU-free estimate of the peak GPU memory of training, per phase and itemised (``lowmcgm estimate``).

The figures are traced, not modelled: :func:`trace_jobs` runs in a subprocess under fake CUDA tensors
(:mod:`lowmcgm.memory.trace`). It builds the base model's UNet, text encoder and VAE from their config
files on the meta device, hands them to the trainer's own ``prepare_setup`` (handles with a stand-in
tokenizer, mask encoder, capture processors, checkpointing, casts and moves, the photo encode, the VAE
offload), then runs the trainer's ``new_state`` and ``train_step`` twice per phase (the second step has
optimizer state) and reads the live-bytes counter. What it counts is what ``max_memory_allocated``
would report; what a real card adds on top (CUDA context, allocator slack, kernel workspaces) is the
margin of :func:`required_card_bytes`.

Parts of a peak (they sum to it): frozen weights, trainable weights, optimizer state and other
resident tensors (text cache, inputs) are what is live when the step starts; gradients are those
already accumulated at the moment of the peak; activations are the tensors the forward pass kept for
backward, as far as they are still live at the peak; transient is the rest (recomputation under
checkpointing, attention and optimizer temporaries). The byte counts are measured; the constants below
carry their sources. This module leaves printing to ``cli.py`` (``format_estimate`` returns text).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowmcgm.memory import trace as mt
from lowmcgm.attention_capture import CapturingCrossAttnProcessor, CrossAttentionStore
from lowmcgm.config import Config, apply_overrides, config_from_dict, config_to_dict
from lowmcgm.data import ConceptImage
from lowmcgm.errors import UserError

GiB = 2**30
MiB = 2**20
# Card sizes a user picks between. Cards are sold by binary gigabytes: an "8 GB" card has 8192 MiB.
CARD_TIERS_GIB = (4, 6, 8, 10, 12, 16, 24)
# What a real card needs beyond the traced peak (max_memory_allocated); typical ranges, quoted, as
# docs/benchmarks.md (Memory) states them:
CUDA_CONTEXT_BYTES = 512 * MiB  # "CUDA context 0.3-0.6 GiB": toward the top of the range
WORKSPACE_BYTES = 100 * MiB  # "cuBLAS/cuDNN workspaces up to about 100 MiB"
ALLOCATOR_SLACK = 0.10  # "caching-allocator slack 5-20 %" (max_memory_reserved over allocated): mid-range
# Steps traced per phase: the first creates the optimizer state, the second runs with it (steady state).
STEPS_PER_PHASE = 2
# Attention layouts a trace can use. "sdpa" is the trainer as configured; the others swap processors
# after setup, for the benchmark's ablations and its reference row (the reference code's explicit
# softmax on every layer, keeping every cross-attention map).
ATTENTION_LAYOUTS = ("sdpa", "explicit-self", "full-capture", "explicit")
PART_NAMES = ("frozen_weights", "trainable_weights", "optimizer_state", "other_resident", "gradients",
              "activations", "transient")
PART_LABELS = {
    "frozen_weights": "frozen weights",
    "trainable_weights": "trainable weights",
    "optimizer_state": "optimizer state",
    "other_resident": "other resident (text cache, inputs)",
    "gradients": "gradients (live at the peak)",
    "activations": "activations kept for backward (live at the peak)",
    "transient": "transient (recompute, attention and optimizer temporaries)",
}
# Settings that lower the peak, cheapest in quality first: what a config that does not fit may try.
MEMORY_TOGGLES: tuple[tuple[str, Any], ...] = (
    ("model.use_gradient_checkpointing", True),
    ("model.use_vae_offload", True),
    ("train.optimizer", "adamw8bit"),
    ("model.mixed_precision", "fp16"),
    ("train.batch_size", 1),
    ("train.use_prior_preservation", False),
    ("lora.phase2_mode", "lora"),
    ("lora.use_text_encoder_lora", False),
    ("train.phase2_handle_lr", 0.0),
)


def required_card_bytes(peak_bytes: int) -> int:
    """Card memory needed for a traced peak: peak plus allocator slack, CUDA context and workspaces."""
    return int(peak_bytes * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES + WORKSPACE_BYTES


def max_peak_for_card(card_gib: float) -> int:
    """The largest traced peak that still fits a card of ``card_gib`` GiB (inverse of the above)."""
    return int((card_gib * GiB - CUDA_CONTEXT_BYTES - WORKSPACE_BYTES) / (1 + ALLOCATOR_SLACK))


def margin_note() -> str:
    return (f"a card fits when peak x {1 + ALLOCATOR_SLACK:.2f} (allocator slack) + "
            f"{CUDA_CONTEXT_BYTES / GiB:.2f} GiB (CUDA context) + {WORKSPACE_BYTES / MiB:.0f} MiB "
            "(cuBLAS/cuDNN workspaces) <= its memory")


@dataclass
class PhaseEstimate:
    """One phase: the peak of its training steps and its parts (bytes)."""

    phase: int
    peak_bytes: int
    parts: dict[str, int]
    peak_during: str  # forward, backward, optimizer step, ...
    gradients_total_bytes: int  # every gradient, at the end of backward
    activations_kept_bytes: int  # everything the forward pass left live for backward
    setup_peak_bytes: int  # before the first step: setup (phase 1) or adapters/text cache (phase 2)
    trainable_params: int
    frozen_params: int
    optimizer: str
    peak_reserved_bytes: int | None = None  # real CUDA runs only: max_memory_reserved of the steps

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PhaseEstimate:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass
class Estimate:
    """The traced figures of one configuration."""

    model: str
    resolution: int
    attention: str
    phases: list[PhaseEstimate]
    config: dict[str, Any]
    analytic: list[str] = field(default_factory=list)  # parts accounted by formula, not traced
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def peak_bytes(self) -> int:
        """The highest figure of the run: every phase's steps and setup."""
        return max(max(p.peak_bytes, p.setup_peak_bytes) for p in self.phases)

    def fits(self, card_gib: float) -> bool:
        return required_card_bytes(self.peak_bytes) <= card_gib * GiB

    def card_tiers(self) -> list[int]:
        """The tiers of :data:`CARD_TIERS_GIB` this configuration fits."""
        return [c for c in CARD_TIERS_GIB if self.fits(c)]

    def phase(self, number: int) -> PhaseEstimate:
        return next(p for p in self.phases if p.phase == number)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able figures (bytes); :meth:`from_dict` reads them back."""
        return {
            "model": self.model, "resolution": self.resolution, "attention": self.attention, "config": self.config,
            "peak_bytes": self.peak_bytes, "required_card_bytes": required_card_bytes(self.peak_bytes),
            "fits_gib": self.card_tiers(), "margin": margin_note(),
            "phases": [dataclasses.asdict(p) for p in self.phases],
            "analytic": self.analytic, "notes": self.notes, "wall_s": self.wall_s,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Estimate:
        return cls(model=data["model"], resolution=data["resolution"], attention=data["attention"],
                   phases=[PhaseEstimate.from_dict(p) for p in data["phases"]], config=data["config"],
                   analytic=data["analytic"], notes=data["notes"], wall_s=data["wall_s"])


@dataclass
class Suggestion:
    """A change that makes a configuration fit a card, with its estimate."""

    what: str  # "preset 6gb" or "--set a=b --set c=d"
    overrides: dict[str, Any]
    preset: str | None
    estimate: Estimate | None  # None until traced


# ------------------------------------------------------------------------------------ parent side


def resolve_model(spec: str) -> str:
    """Check ``--base-model`` for an estimate: a shipped config name, ``tiny``/``tiny-v``, or a local
    diffusers folder (only its config files are read). Returns the spec to pass to the trace.

    Raises:
        UserError: anything else (single files, hub ids: pass the matching shipped name).
    """
    from lowmcgm.model_configs import SHIPPED_CONFIGS
    from lowmcgm.models import TINY_NAMES, TOY_NAME

    if spec in SHIPPED_CONFIGS or spec in TINY_NAMES:
        return spec
    if spec == TOY_NAME:  # the bundled toy model: a diffusers folder like any other
        from lowmcgm.toy.bundled import require_toy_model

        return str(require_toy_model().resolve())
    folder = Path(spec).expanduser()
    if folder.is_dir():
        missing = [p for p in ("unet/config.json", "text_encoder/config.json", "vae/config.json",
                               "scheduler/scheduler_config.json") if not (folder / p).is_file()]
        if missing:
            raise UserError(f"'{folder}' is not a diffusers model folder: {', '.join(missing)} missing.")
        return str(folder.resolve())
    known = ", ".join(sorted(SHIPPED_CONFIGS))
    raise UserError(f"--base-model '{spec}' for an estimate must be {known}, tiny, toy, or a local diffusers "
                    "folder (only its config files are read); for a single .safetensors file pass the "
                    "shipped name of its architecture.")


def card_of_preset(preset: str | None) -> float | None:
    """The card a shipped preset is named for (``8gb`` -> 8.0), else None."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)gb", Path(preset).stem if preset else "")
    return float(m.group(1)) if m else None


def build_job(cfg: Config, model: str, resolution: int | None = None, attention: str = "sdpa",
              num_concepts: int = 2, label: str = "") -> dict[str, Any]:
    """The JSON description of one configuration for :func:`trace_jobs`."""
    if attention not in ATTENTION_LAYOUTS:
        raise ValueError(f"attention must be one of {ATTENTION_LAYOUTS}")
    if resolution:
        cfg = apply_overrides(cfg, {"model.resolution": resolution}, "the estimate")
    return {"config": config_to_dict(cfg), "model": model, "attention": attention,
            "num_concepts": num_concepts, "label": label}


def run_jobs(jobs: list[dict[str, Any]], *, mode: str = "fake", stop_below_bytes: int | None = None,
             timeout_s: float = 900.0, env: dict[str, str] | None = None) -> list[Estimate | None]:
    """Trace ``jobs`` (from :func:`build_job`) in one subprocess, in order.

    Args:
        mode: ``"fake"`` (the estimate), ``"cuda"`` (a real GPU: random full-size weights, measured)
            or ``"cpu"`` (real tensors on the CPU; only sensible for the tiny models).
        stop_below_bytes: a job carrying a ``group`` is skipped once a job of its group, or an
            ungrouped one, peaked at or below this (the search for a configuration that fits).

    Returns:
        One :class:`Estimate` per job, None for skipped ones.
    """
    try:
        out = mt.run_traced("lowmcgm.memory.estimate:trace_jobs", {"jobs": jobs, "stop_below_bytes": stop_below_bytes},
                            timeout_s, mode=mode, env=env)
    except mt.ShimBuildError as exc:  # no C++ compiler: the user can install one
        raise UserError(f"lowmcgm estimate cannot trace on this machine: {str(exc).splitlines()[0]}.") from exc
    except mt.TraceError as exc:  # a bug, not the user's: the child's traceback goes with it
        raise RuntimeError(f"{exc}\n{exc.child_traceback or exc.stderr_tail}") from exc
    return [_estimate_from(job, res) if res is not None else None for job, res in zip(jobs, out["result"])]


def estimate(cfg: Config, model: str, resolution: int | None = None, *, attention: str = "sdpa",
             num_concepts: int = 2, mode: str = "fake", timeout_s: float = 900.0) -> Estimate:
    """Trace the training of ``cfg`` on ``model``'s architecture; see the module docstring.

    Example:
        >>> cfg = resolve_config("8gb", None, {})
        >>> est = estimate(cfg, "sd15")            # about 20 s on 2 cores
        >>> est.phase(2).peak_bytes / 2**30, est.card_tiers()
    """
    return run_jobs([build_job(cfg, resolve_model(model), resolution, attention, num_concepts)],
                    mode=mode, timeout_s=timeout_s)[0]


def candidate_jobs(cfg: Config, model: str, card_gib: float, resolution: int | None = None,
                   own_preset: str | None = None) -> list[tuple[Suggestion, dict[str, Any]]]:
    """What to try when ``cfg`` does not fit a card of ``card_gib`` GiB: the shipped presets made
    for that card or a smaller one (best first), and the :data:`MEMORY_TOGGLES` applied one after
    another on top of ``cfg``. Returns (suggestion without its estimate, job) pairs; the jobs carry
    a ``group`` so that :func:`trace_jobs` stops each search at its first fit."""
    from lowmcgm.config import resolve_config
    from lowmcgm.presets import list_presets

    own = Path(own_preset).stem if own_preset else None
    names = [n for n in list_presets() if n != own and card_of_preset(n) is not None and card_of_preset(n) <= card_gib]
    out = []
    for name in sorted(names, key=lambda n: -card_of_preset(n)):
        job = build_job(resolve_config(name, None, {}), model, resolution) | {"group": "presets"}
        out.append((Suggestion(f"preset {name}", {}, name, None), job))
    overrides: dict[str, Any] = {}
    current = cfg
    for key, value in MEMORY_TOGGLES:
        section, name = key.split(".")
        if getattr(getattr(current, section), name) == value:
            continue
        overrides = overrides | {key: value}
        current = apply_overrides(current, {key: value}, "the estimate")
        what = " ".join(f"--set {k}={_toml_word(v)}" for k, v in overrides.items())
        out.append((Suggestion(what, dict(overrides), None, None), build_job(current, model, resolution) | {"group": "toggles"}))
    return out


def check_and_suggest(cfg: Config, model: str, resolution: int | None = None, card_gib: float | None = None,
                      preset: str | None = None,
                      timeout_s: float = 1800.0) -> tuple[Estimate, float | None, list[Suggestion] | None]:
    """What ``lowmcgm estimate`` runs: the estimate, the card to fit, and, when it does not fit,
    the settings that would (:func:`candidate_jobs`), all in one tracing subprocess.

    The card is ``card_gib``, else the one the preset is named for, else (when no tier fits at
    all) the largest tier. Returns (estimate, card or None, suggestions or None when it fits).
    """
    model = resolve_model(model)
    target = card_gib or card_of_preset(preset) or float(CARD_TIERS_GIB[-1])
    candidates = candidate_jobs(cfg, model, target, resolution, preset)
    jobs = [build_job(cfg, model, resolution)] + [job for _, job in candidates]
    # The candidates are skipped in the subprocess when the configuration itself fits.
    results = run_jobs(jobs, stop_below_bytes=max_peak_for_card(target), timeout_s=timeout_s)
    est = results[0]
    card = card_gib or card_of_preset(preset) or (None if est.card_tiers() else target)
    if card is None or est.fits(card):
        return est, card, None
    return est, card, [dataclasses.replace(sug, estimate=found) for (sug, _), found in zip(candidates, results[1:])
                       if found is not None and found.fits(card)]


def _toml_word(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _estimate_from(job: dict[str, Any], res: dict[str, Any]) -> Estimate:
    cfg = job["config"]
    return Estimate(model=job["model"], resolution=res["resolution"], attention=job["attention"],
                    phases=[PhaseEstimate.from_dict(p) for p in res["phases"]], config=cfg,
                    analytic=res["analytic"], notes=res["notes"], wall_s=res["wall_s"])


def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def format_estimate(est: Estimate, card_gib: float | None = None,
                    suggestions: list[Suggestion] | None = None) -> str:
    """The human-readable report: per phase, the peak and its parts; the cards it fits; suggestions."""
    lines = [f"Peak GPU memory of one training step: {est.model} at {est.resolution} px "
             f"(traced on fake CUDA tensors, {est.wall_s:.0f} s)"]
    header = f"  {'':<58}" + "".join(f"{'phase ' + str(p.phase):>12}" for p in est.phases)
    lines.append(header)
    for part in PART_NAMES:
        lines.append(f"  {PART_LABELS[part]:<58}" + "".join(f"{format_bytes(p.parts[part]):>12}" for p in est.phases))
    lines.append(f"  {'peak of the step':<58}" + "".join(f"{format_bytes(p.peak_bytes):>12}" for p in est.phases))
    lines.append(f"  {'  reached during':<58}" + "".join(f"{p.peak_during:>12}" for p in est.phases))
    lines.append(f"  {'all gradients (end of backward)':<58}"
                 + "".join(f"{format_bytes(p.gradients_total_bytes):>12}" for p in est.phases))
    lines.append(f"  {'all kept activations (end of forward)':<58}"
                 + "".join(f"{format_bytes(p.activations_kept_bytes):>12}" for p in est.phases))
    lines.append(f"  {'setup before the steps (photo encode, adapters, cache)':<58}"
                 + "".join(f"{format_bytes(p.setup_peak_bytes):>12}" for p in est.phases))
    lines.append(f"  {'trainable parameters':<58}" + "".join(f"{p.trainable_params / 1e6:>11.2f}M" for p in est.phases))
    lines.append(f"  {'optimizer':<58}" + "".join(f"{p.optimizer:>12}" for p in est.phases))
    need = required_card_bytes(est.peak_bytes)
    tiers = est.card_tiers()
    lines.append(f"Highest figure {format_bytes(est.peak_bytes)}; with the margin a card needs "
                 f"{format_bytes(need)} ({margin_note()}).")
    lines.append("Fits: " + (", ".join(f"{c} GB" for c in tiers) if tiers else
                             f"none of the {', '.join(map(str, CARD_TIERS_GIB))} GB cards") + ".")
    for note in est.notes + [f"analytic, not traced: {a}" for a in est.analytic]:
        lines.append(f"Note: {note}")
    if card_gib is not None and not est.fits(card_gib):
        lines.append(f"Does not fit a {card_gib:g} GB card.")
        if suggestions:
            lines.append(f"These would fit {card_gib:g} GB:")
            for s in suggestions:
                lines.append(f"  {s.what}: {format_bytes(s.estimate.peak_bytes)} "
                             f"(card needs {format_bytes(required_card_bytes(s.estimate.peak_bytes))})")
        elif suggestions is not None:
            lines.append("No shipped preset or memory setting tried makes it fit; lower --resolution.")
    return "\n".join(lines)


def estimate_to_json(est: Estimate, suggestions: list[Suggestion] | None = None,
                     card_gib: float | None = None) -> str:
    data = est.to_dict()
    if card_gib is not None:
        data["card_gib"] = card_gib
        data["fits_card"] = est.fits(card_gib)
    if suggestions is not None:
        data["suggestions"] = [{"what": s.what, "overrides": s.overrides, "preset": s.preset,
                                "peak_bytes": s.estimate.peak_bytes,
                                "required_card_bytes": required_card_bytes(s.estimate.peak_bytes)}
                               for s in suggestions]
    return json.dumps(data, indent=2)


# ------------------------------------------------------------------------------- traced side
# Everything below runs inside the tracing subprocess (memory_trace.run_traced), which has loaded the
# fake-CUDA shim before importing torch, and so this module.


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
    from lowmcgm.handles import default_handles
    from lowmcgm.models import TINY_WORDS
    from lowmcgm.trainer import prepare_setup

    s = mt.session()
    started = time.perf_counter()
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
    gc.collect()
    baseline = s.counter.current
    s.reset_peak()
    base = _build_base(model, s)
    resolution = cfg.model.resolution or base.resolution
    latent = resolution // base.vae_scale_factor
    prior = torch.randn(2, base.vae.config.latent_channels, latent, latent) \
        if cfg.train.use_prior_preservation else None  # stands for the encoded class images
    acc = TraceAccelerator(s.device, "no" if s.device.type == "cpu" else cfg.model.mixed_precision)
    setup = prepare_setup(cfg, base, _random_concept(resolution, n), default_handles(n), acc,
                          lambda event: None, lambda device: prior)
    _install_attention_layout(setup, attention)
    # The models are built: freeze what the cyclic collector would otherwise rescan at every
    # gc.collect() below (about 1 s each for an SD-size model; milliseconds once frozen).
    gc.collect()
    gc.freeze()
    try:
        phases = _trace_phases(s, cfg, setup, baseline)
    finally:
        gc.unfreeze()
    return {"resolution": resolution, "phases": phases, "analytic": [], "notes": notes,
            "baseline_bytes": baseline, "wall_s": round(time.perf_counter() - started, 2)}


def _trace_phases(s: mt.TraceSession, cfg: Config, setup: Any, baseline: int) -> list[dict[str, Any]]:
    from lowmcgm.trainer import add_phase2_adapters, new_state

    phases, state, setup_peak = [], None, s.counter.peak - baseline
    for phase in (1, 2):
        if (cfg.train.phase1_steps if phase == 1 else cfg.train.phase2_steps) == 0:
            continue
        if phase == 2:
            s.reset_peak()
        # As train(): adapters arrive for phase 2, whose state is built while the phase-1 one is
        # still referenced.
        if phase == 2:
            add_phase2_adapters(setup)
        new = new_state(setup, phase, generator=state.generator if state else None)
        state = new
        del new
        gc.collect()
        if phase == 2:
            setup_peak = s.counter.peak - baseline
        figures = _trace_steps(s, setup, state, baseline)
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
    from transformers import CLIPTextModel

    from lowmcgm.model_configs import SHIPPED_CONFIGS
    from lowmcgm.models import TINY_NAMES, TINY_WORDS, BaseModel, build_tiny_base
    from lowmcgm.tokenizer import build_clip_tokenizer

    if model in TINY_NAMES:
        return build_tiny_base(model)
    folder = SHIPPED_CONFIGS.get(model) or Path(model)
    parts = [mt.build_from_config(cls, folder / sub) for cls, sub in
             ((UNet2DConditionModel, "unet"), (CLIPTextModel, "text_encoder"), (AutoencoderKL, "vae"))]
    if not s.is_fake:
        for module in parts:  # meta cannot be copied to a real device: random weights on the CPU
            mt.materialize(module, None, "cpu")
    unet, text_encoder, vae = parts
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    # A stand-in tokenizer: install_handles only grows the embedding table, so a small vocabulary
    # with the real 77-token length gives the same shapes as the model's own tokenizer.
    tokenizer = build_clip_tokenizer(list(TINY_WORDS))
    return BaseModel(tokenizer, text_encoder, vae, unet, scheduler, name=str(model))


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
        self.probe: _StepProbe | None = None

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


class _StepProbe(TorchDispatchMode):
    """Follows one phase's training steps: which part of the step runs, the bytes at its boundaries,
    the gradients accumulated so far, and where the peak was reached.

    A dispatch mode above the live-bytes counter: after every op it checks whether the peak rose
    and, if so, notes the step, the part of it and the gradient bytes live then. Gradients are
    counted by post-accumulate hooks on the trainable parameters (O(1) per gradient).
    """

    def __init__(self, counter: Any, params: list[torch.nn.Parameter]):
        super().__init__()
        self.counter = counter
        self.window = "between steps"
        self.steps: list[dict[str, int]] = []
        self.grad_bytes = 0
        self._seen: set[int] = set()
        self.best = -1
        self.at_peak: dict[str, Any] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_done) for p in params]

    def _grad_done(self, param: torch.nn.Parameter) -> None:
        if id(param) not in self._seen and param.grad is not None:
            self._seen.add(id(param))
            self.grad_bytes += mt.storage_bytes([param.grad])

    def begin_step(self, optimizer_state_bytes: int) -> None:
        self.grad_bytes, self._seen = 0, set()
        self.steps.append({"start": self.counter.current, "optimizer_state": optimizer_state_bytes,
                           "activations": 0, "gradients": 0})

    def enter(self, window: str) -> None:
        self.window = window

    def forward_begins(self) -> None:
        self.window = "forward"
        self.steps[-1]["start"] = self.counter.current  # build_batch ran on the CPU

    def forward_done(self) -> None:
        self.steps[-1]["activations"] = self.counter.current - self.steps[-1]["start"]
        self.window = "backward"

    def backward_done(self) -> None:
        self.steps[-1]["gradients"] = self.grad_bytes
        self.window = "clip"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.counter.peak > self.best:
            self.best = self.counter.peak
            self.at_peak = {"step": len(self.steps) - 1, "window": self.window, "gradients": self.grad_bytes}
        return out

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _trace_steps(s: mt.TraceSession, setup: Any, state: Any, baseline: int) -> dict[str, Any]:
    """Run the trainer's ``train_step`` :data:`STEPS_PER_PHASE` times under a probe; return the
    phase's peak and its parts (bytes, relative to ``baseline``)."""
    from lowmcgm.trainer import train_step

    optimizer = state.optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    probe = _StepProbe(s.counter, params)
    setup.accelerator.probe = probe
    hooks = [optimizer.register_step_pre_hook(lambda *a: probe.enter("optimizer step")),
             optimizer.register_step_post_hook(lambda *a: probe.enter("zero_grad"))]
    gc.collect()
    s.reset_peak()
    try:
        for _ in range(STEPS_PER_PHASE):
            probe.begin_step(_optimizer_state_bytes(optimizer, s.device.type))
            with probe:
                train_step(setup, state)
            probe.enter("between steps")
            if isinstance(setup.store, _KeepAllStore):
                setup.store.kept = []  # the reference's AttentionStore is reset after the step
    finally:
        for hook in hooks:
            hook.remove()
        probe.close()
        setup.accelerator.probe = None

    peak = s.counter.peak - baseline
    at = probe.at_peak or {"step": len(probe.steps) - 1, "window": "between steps", "gradients": 0}
    step = probe.steps[at["step"]]
    trainable = {id(p) for p in params}
    frozen = [t for m in _device_modules(setup) for t in list(m.parameters()) + list(m.buffers())
              if id(t) not in trainable and t.device.type == s.device.type]
    frozen_bytes, trainable_bytes = mt.storage_bytes(frozen), mt.storage_bytes(params)
    resident = step["start"] - baseline  # everything live when the step began
    rest = peak - resident - at["gradients"]
    # Kept activations are all live at the end of forward and die during backward: attribute to
    # them what they can hold of the rest; after backward they are gone.
    activations = min(step["activations"], rest) if at["window"] in ("forward", "backward", "clip") else 0
    parts = {"frozen_weights": frozen_bytes, "trainable_weights": trainable_bytes,
             "optimizer_state": step["optimizer_state"],
             "other_resident": resident - frozen_bytes - trainable_bytes - step["optimizer_state"],
             "gradients": at["gradients"], "activations": activations, "transient": rest - activations}
    return {"peak_bytes": peak, "parts": parts, "peak_during": at["window"],
            "gradients_total_bytes": max(st["gradients"] for st in probe.steps),
            "activations_kept_bytes": max(st["activations"] for st in probe.steps),
            "trainable_params": sum(p.numel() for p in params),
            "frozen_params": sum(t.numel() for t in frozen if t.is_floating_point()),
            "optimizer": type(optimizer).__name__,
            "peak_reserved_bytes": s.counter.report().get("peak_reserved_bytes")}


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer, device_type: str) -> int:
    """Optimizer state on the device (torch AdamW keeps its ``step`` counters on the CPU)."""
    return mt.storage_bytes(t for state in optimizer.state.values() for t in tree_leaves(state)
                            if isinstance(t, torch.Tensor) and t.device.type == device_type)


def _device_modules(setup: Any) -> list[torch.nn.Module]:
    base = setup.base
    mods = [base.unet, base.text_encoder, base.vae, setup.mcgm.handles]
    return mods + ([setup.mcgm.mask_encoder] if setup.mcgm.mask_encoder is not None else [])


# ------------------------------------------------------------------- attention layouts (benchmarks)


def _install_attention_layout(setup: Any, layout: str) -> None:
    """Swap attention processors after setup for the benchmark's ablations (``sdpa`` keeps the
    trainer's): ``explicit-self`` puts diffusers' explicit ``AttnProcessor`` on every self-attention
    layer; ``full-capture`` makes every cross-attention layer compute and keep its full softmax (all
    77 + K columns, as the reference's AttentionStore); ``explicit`` does both (the reference code)."""
    if layout == "sdpa":
        return
    unet = setup.base.unet
    processors = dict(unet.attn_processors)
    loss_layers = {name for name, proc in processors.items() if isinstance(proc, CapturingCrossAttnProcessor)}
    if layout in ("explicit-self", "explicit"):
        processors.update({name: AttnProcessor() for name in processors if name.endswith("attn1.processor")})
    if layout in ("full-capture", "explicit"):
        store = _KeepAllStore() if setup.store is not None else None
        for name in processors:
            if name.endswith("attn2.processor"):
                processors[name] = _FullSoftmaxCapture(store, name.removesuffix(".processor"), name in loss_layers)
        setup.store = store
    unet.set_attn_processor(dict(processors))  # a copy: diffusers pops from the dict it gets


class _KeepAllStore(CrossAttentionStore):
    """The trainer's store, plus every cross-attention layer's full probabilities for the step."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[torch.Tensor] = []

    def begin(self, key_index: torch.Tensor) -> None:
        super().begin(key_index)
        self.kept = []


class _FullSoftmaxCapture:
    """diffusers' explicit attention on a cross-attention layer, keeping the whole (B*H, N, L)
    softmax for the step (the reference's P2P processor and AttentionStore); loss layers also record
    the handle and mask-token columns for the trainer's losses."""

    def __init__(self, store: _KeepAllStore | None, layer: str, is_loss_layer: bool):
        self.store, self.layer, self.is_loss_layer = store, layer, is_loss_layer

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        batch, n, _ = hidden_states.shape
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*H, N, D)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B*H, L, D)
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # (B*H, N, L)
        store = self.store
        if store is not None and store.key_index is not None:
            if store.recording:  # not during checkpoint recomputation, as the reference's store
                store.kept.append(probs)
            if self.is_loss_layer:  # in recomputation too: checkpointing needs the same graph
                per_head = probs.view(batch, attn.heads, n, -1)
                index = store.key_index.to(probs.device)[:, None, None, :].expand(
                    batch, attn.heads, n, store.key_index.shape[1])
                store.record(self.layer, torch.gather(per_head, -1, index).float())
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor
