"""GPU-free estimate of the peak GPU memory of training, per phase and itemised (``lowmcgm estimate``).

The figures are traced, not modelled: the configuration's training runs in a subprocess under fake
CUDA tensors (:mod:`lowmcgm.memory.trace`), where :mod:`lowmcgm.memory.training_trace` builds the base
model from its config files, prepares it with the trainer's own code, runs two training steps per
phase and reads the live-bytes counter. What it counts is what ``max_memory_allocated`` would report;
what a real card adds on top (CUDA context, allocator slack, kernel workspaces) is the margin of
:func:`required_card_bytes`. This module is the parent side: the jobs, the margin, the search for
settings that fit a card, and the report.

Parts of a peak (they sum to it): frozen weights, trainable weights, optimizer state and other
resident tensors (text cache, inputs) are what is live when the step starts; gradients are those
already accumulated at the moment of the peak; activations are the tensors the forward pass kept for
backward, as far as they are still live at the peak; transient is the rest (recomputation under
checkpointing, attention and optimizer temporaries). The byte counts are measured; the constants below
carry their sources. This module leaves printing to ``cli.py`` (``format_estimate`` returns text).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowmcgm.config import Config, apply_overrides, config_to_dict
from lowmcgm.errors import UserError
from lowmcgm.limits import MAX_CARD_GB
from lowmcgm.memory import trace as mt
from lowmcgm.memory.attention_layouts import ATTENTION_LAYOUTS
from lowmcgm.memory.step_probe import PART_NAMES

GiB = 2**30
MiB = 2**20
# Card sizes a user picks between. Cards are sold by binary gigabytes: an "8 GB" card has 8192 MiB.
CARD_TIERS_GIB = (4, 6, 8, 10, 12, 16, 24)
# What a real card needs beyond the traced peak (max_memory_allocated); typical ranges, quoted, as
# docs/benchmarks.md (Memory) states them:
CUDA_CONTEXT_BYTES = 512 * MiB  # "CUDA context 0.3-0.6 GiB": toward the top of the range
WORKSPACE_BYTES = 100 * MiB  # "cuBLAS/cuDNN workspaces up to about 100 MiB"
ALLOCATOR_SLACK = 0.10  # "caching-allocator slack 5-20 %" (max_memory_reserved over allocated): mid-range
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
    from lowmcgm.models.base import TOY_NAME
    from lowmcgm.models.configs import SHIPPED_CONFIGS
    from lowmcgm.models.tiny import TINY_NAMES

    folder = SHIPPED_CONFIGS.get(spec) or Path(spec).expanduser()
    if spec in SHIPPED_CONFIGS or spec in TINY_NAMES:
        return spec
    if spec == TOY_NAME:  # the bundled toy model: a diffusers folder like any other
        from lowmcgm.toy.bundled import require_toy_model

        return str(require_toy_model().resolve())
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
    """The card a shipped preset is named for (``8gb`` and ``sdxl-8gb`` -> 8.0), else None."""
    m = re.fullmatch(r"(?:sdxl-)?(\d+(?:\.\d+)?)gb", Path(preset).stem if preset else "")
    return float(m.group(1)) if m else None


def preset_group(name: str) -> str:
    """The models a shipped preset is made for, by its name: ``sdxl`` (``sdxl-8gb``) or ``sd``
    (``8gb``: SD 1.x and 2.x). ``models.fit.preset_group_of_model`` says the same of a model."""
    return "sdxl" if Path(name).stem.startswith("sdxl-") else "sd"


def check_family_settings(cfg: Config, spec: str) -> None:
    """Refuse to estimate what training would refuse on the model's family (``models.fit``): a figure
    for settings that cannot run says nothing."""
    from lowmcgm.models.fit import problems_before_loading

    problems = problems_before_loading(cfg, spec)
    if problems:
        raise UserError(f"--base-model {spec} is an SDXL model: " + "; ".join(problems)
                        + " (the sdxl-6gb, sdxl-8gb and sdxl-12gb presets are made for SDXL).")


def build_job(cfg: Config, model: str, resolution: int | None = None, attention: str = "sdpa",
              num_concepts: int = 2, label: str = "") -> dict[str, Any]:
    """The JSON description of one configuration for :func:`~lowmcgm.memory.training_trace.trace_jobs`."""
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
        out = mt.run_traced("lowmcgm.memory.training_trace:trace_jobs", {"jobs": jobs, "stop_below_bytes": stop_below_bytes},
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
    check_family_settings(cfg, model)
    return run_jobs([build_job(cfg, resolve_model(model), resolution, attention, num_concepts)],
                    mode=mode, timeout_s=timeout_s)[0]


def candidate_jobs(cfg: Config, model: str, card_gib: float, resolution: int | None = None,
                   own_preset: str | None = None) -> list[tuple[Suggestion, dict[str, Any]]]:
    """What to try when ``cfg`` does not fit a card of ``card_gib`` GiB: the shipped presets made
    for that card or a smaller one (best first), and the :data:`MEMORY_TOGGLES` applied one after
    another on top of ``cfg``. Returns (suggestion without its estimate, job) pairs; the jobs carry
    a ``group`` so that :func:`~lowmcgm.memory.training_trace.trace_jobs` stops each search at its first fit."""
    from lowmcgm.config import resolve_config
    from lowmcgm.models.fit import preset_group_of_model
    from lowmcgm.presets import list_presets

    own = Path(own_preset).stem if own_preset else None
    group = preset_group_of_model(model)
    names = [n for n in list_presets() if n != own and preset_group(n) == group
             and card_of_preset(n) is not None and card_of_preset(n) <= card_gib]
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
    if card_gib is not None and not (math.isfinite(card_gib) and 0 < card_gib <= MAX_CARD_GB):
        raise UserError(f"--card must be the card's memory in GB, above 0 and at most {MAX_CARD_GB} "
                        f"(got {card_gib:g}).")
    check_family_settings(cfg, model)
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


def config_words(cfg: Config, *, precision_note: str = "", extras: tuple[str, ...] = (),
                 batch_note: str = "") -> list[str]:
    """The settings of ``cfg`` that decide a step's cost, in a few words, for the benchmark tables
    (``tools/bench_memory.py``, ``tools/bench_flops.py``; each adds its own notes).

    Args:
        cfg: the configuration a table row runs.
        precision_note: put after a LoRA run's compute precision (``" base"``).
        extras: words after the trained weights and their precision (the optimizer).
        batch_note: put after the batch size (``" (2 images/step)"``).

    Returns:
        Trained weights and precision, ``extras``, checkpointing, prior preservation, batch size,
        and the MCGM losses that are off.
    """
    m, lo, t = cfg.model, cfg.lora, cfg.train
    if lo.phase2_mode == "full":  # trained weights are fp32 masters whatever the autocast
        what = ["full UNet+TE", "fp32" if m.mixed_precision == "no" else f"fp32 weights, {m.mixed_precision} autocast"]
    else:
        what = [f"LoRA r{lo.rank}" + (" +TE" if lo.use_text_encoder_lora else ""), m.mixed_precision + precision_note]
    what += ["fp8 UNet"] * m.fp8_base + ["fp8 TE"] * m.fp8_text_encoders
    what += list(extras)
    what += ["ckpt"] * m.use_gradient_checkpointing + ["TE ckpt"] * m.text_encoder_checkpointing
    what += ["prior"] * t.use_prior_preservation
    what.append(f"batch {t.batch_size}{batch_note}")
    if not cfg.loss.use_attention_loss:
        what.append("no attention loss")
    if not cfg.loss.use_mask_tokens:
        what.append("no mask tokens")
    return what


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
