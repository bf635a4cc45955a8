"""Validation: every value of a ``Config`` checked against what its field declares (choices,
bounds, finite numbers) and the rules that tie fields together; all problems in one ``UserError``."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Collection

from lowmcgm.config.schema import Config, SampleSettings, field_flag, section_types
from lowmcgm.errors import UserError
from lowmcgm.limits import MAX_RESOLUTION_PX, MAX_SEED


Namer = Callable[[str], str]


def _declared_problems(values: Any, section: str, name: Namer) -> list[str]:
    """What the fields of one section declare: choices, bounds, and finite floats (TOML and --set
    both accept nan and inf)."""
    problems = []
    for f in dataclasses.fields(values):
        key, value = f"{section}.{f.name}", getattr(values, f.name)
        choices, bounds = f.metadata["choices"], f.metadata["bounds"]
        if choices and value not in choices:
            named = ", ".join(c for c in choices if c) + (" or empty" if "" in choices else "")
            problems.append(f"{name(key)} must be one of {named} (got '{value}')")
        low, high = f.metadata["at_least"], f.metadata["at_most"]
        if isinstance(value, float) and not math.isfinite(value):  # NaN would fail every bound too: said once
            problems.append(f"{name(key)} must be a finite number (got {value})")
        elif bounds and not bounds[0] <= value <= bounds[1]:
            problems.append(f"{name(key)} must be between {_number(bounds[0])} and {_number(bounds[1])} "
                            f"(got {value})")
        elif low is not None and value < low:
            said = ">= 0" if low == 0 else "positive" if low == 1 else f">= {_number(low)}"
            problems.append(f"{name(key)} must be {said} (got {value})")
        elif high is not None and value > high:
            problems.append(f"{name(key)} must be at most {_number(high)} (got {value})")
        elif f.metadata["above"] is not None and value <= f.metadata["above"]:
            problems.append(f"{name(key)} must be > {_number(f.metadata['above'])} (got {value})")
        elif f.metadata["below"] is not None and value >= f.metadata["below"]:
            problems.append(f"{name(key)} must be below {_number(f.metadata['below'])} (got {value})")
    return problems


def _number(x: float) -> str:
    """A limit as the messages write it: 1000, 0.25, 0 (not 0.0)."""
    return f"{x:g}" if isinstance(x, float) else str(x)


def sample_problems(s: SampleSettings, name: Namer = lambda key: key) -> list[str]:
    """Every problem of sampling settings (the ``[sample]`` section), each named by ``name(key)``."""
    return _declared_problems(s, "sample", name) + _sample_checks(s, name)


def _sample_checks(s: SampleSettings, name: Namer) -> list[str]:
    """The sampling checks no single field declares: sizes, signs, and bounds set by other fields."""
    problems = []
    for key, value in (("sample.height", s.height), ("sample.width", s.width)):
        if value < 0 or value % 8 or value > MAX_RESOLUTION_PX:
            problems.append(f"{name(key)} must be a positive multiple of 8 up to {MAX_RESOLUTION_PX} (got {value})")
    if not 0 <= s.seed <= MAX_SEED - s.num_images:  # image i uses seed + i
        problems.append(f"{name('sample.seed')} must be between 0 and {MAX_SEED - s.num_images} (got {s.seed})")
    if s.pose_guidance_steps < 0 or s.pose_guidance_steps > s.steps:
        problems.append(f"{name('sample.pose_guidance_steps')} must be between 0 and {name('sample.steps')} "
                        f"({s.steps}) (got {s.pose_guidance_steps})")
    # The normalized rule has no per-layer, per-head energy to add these to, and it averages the maps
    # of every layer it reads, which mid-up's two map sizes do not allow.
    if s.pose_guidance_step != "noise-scaled":
        for key, on, what, other in (
                ("sample.pose_guidance_separation", s.pose_guidance_separation, "", "leave it off"),
                ("sample.pose_guidance_area_normalized", s.pose_guidance_area_normalized, "", "leave it off"),
                ("sample.pose_guidance_layers", s.pose_guidance_layers == "mid-up", " mid-up", "read loss or down")):
            if on:
                problems.append(f"{name(key)}{what} works with the noise-scaled step only "
                                f"({name('sample.pose_guidance_step')} is {s.pose_guidance_step}): set the step to "
                                f"noise-scaled, or {other}")
    return problems


def validate(cfg: Config, by_flag: Collection[str] = ()) -> Config:
    """Check every value; raise one UserError listing all problems.

    Args:
        by_flag: keys a CLI flag set: their problems name the flag (``--steps``), the others the key.
    """
    def name(key: str) -> str:
        return field_flag(key) if key in by_flag else key

    problems = []
    for section in section_types():
        problems += _declared_problems(getattr(cfg, section), section, name)
    if cfg.model.resolution % 8:
        problems.append(f"{name('model.resolution')} must be a multiple of 8 (got {cfg.model.resolution})")
    artifact = cfg.output.artifact_name
    if Path(artifact).name != artifact or "/" in artifact or "\\" in artifact or \
            not artifact.endswith(".safetensors") or artifact.startswith("."):
        problems.append(f"output.artifact_name must be a plain file name ending in .safetensors, written inside "
                        f"--out (got {artifact!r})")
    if cfg.model.fp8_base and cfg.lora.phase2_mode == "full":
        problems.append("model.fp8_base stores frozen weights in fp8, but lora.phase2_mode = 'full' trains them all: "
                        "use 'lora'")
    if cfg.model.fp8_text_encoders and not cfg.model.text_encoder_checkpointing:
        problems.append("model.fp8_text_encoders needs model.text_encoder_checkpointing = true: without it the "
                        "handles' backward keeps each layer's upcast copy, more memory than fp16 weights")
    if cfg.model.fp8_text_encoders and cfg.lora.phase2_mode == "full":
        problems.append("model.fp8_text_encoders stores frozen weights in fp8, but lora.phase2_mode = 'full' trains "
                        "them all: use 'lora'")
    if cfg.lora.init_lora and cfg.lora.phase2_mode == "full":
        problems.append("lora.init_lora needs lora.phase2_mode = 'lora' (a full fine-tune has no adapter to start)")
    if cfg.train.phase1_steps + cfg.train.phase2_steps == 0:
        problems.append("train.phase1_steps and train.phase2_steps are both 0: nothing to train")
    problems += _sample_checks(cfg.sample, name)
    if problems:
        raise UserError("Invalid configuration: " + "; ".join(problems) + ".")
    return cfg
