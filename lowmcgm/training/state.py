"""What a training run holds: its set-up, built once and never changed, and the train state a resume restores.

``Setup`` is built by ``trainer.build_setup`` (the memory estimate builds one on fake tensors);
``TrainState`` by ``phases.enter_phase`` alone, at the start of each phase and on resume. What
changes while a run goes on (the stop signal, the preview hook) is the recipe's
(``recipe.TrainingRecipe``), which drives both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lowmcgm.attention_capture import CrossAttentionStore
from lowmcgm.config import Config
from lowmcgm.data import ConceptImage
from lowmcgm.mcgm import MCGMState
from lowmcgm.models.base import BaseModel
from lowmcgm.models.text_conditioning import TextStates
from lowmcgm.training.accelerator import AcceleratorLike
from lowmcgm.training.optimizer import ADAMW

ProgressFn = Callable[[dict[str, Any]], None]
TextCache = dict[tuple[int, ...], TextStates]  # text-encoder outputs by a prompt's token ids
PreviewFn = Callable[["Setup", "TrainState"], None]


@dataclass(frozen=True)
class Setup:
    """Everything built once per run: models, data, capture, accelerator. Frozen: a run's set-up
    does not change while it trains (what trains changes inside ``mcgm``, what a resume restores
    is the ``TrainState``)."""

    cfg: Config
    base: BaseModel
    concept: ConceptImage
    mcgm: MCGMState  # handles, mask encoder and (from phase 2) adapters: what trains
    store: CrossAttentionStore | None  # None when loss.use_attention_loss is off (no capture)
    accelerator: AcceleratorLike  # accelerate's Accelerator, or the estimator's stand-in
    latent_mean: torch.Tensor  # (2, C, h, w): the photo and its mirror image, encoded once
    latent_std: torch.Tensor
    prior_latents: torch.Tensor | None  # (M, C, h, w) class images, or None
    report: ProgressFn
    capture: dict | None = None  # the processors capture replaced (to put back at the end)
    # SDXL's six size numbers of the photo's crop (sdxl_conditioning.sdxl_time_ids); None for SD 1.x/2.x.
    time_ids: torch.Tensor | None = None
    inputs: dict[str, Any] = field(default_factory=dict)  # runs.identity.input_fingerprints, kept in checkpoints
    # The AdamW this run trains with: train.optimizer, unless 8-bit failed its test step (optimizer.py).
    optimizer_name: str = ADAMW

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


@dataclass
class TrainState:
    """What a resume restores. What is not here cannot come back."""

    phase: int
    step: int  # steps done in this phase
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    history: list[dict[str, float]] = field(default_factory=list)
    # Text-encoder outputs by token ids, when the phase trains nothing in the text encoder (rebuilt
    # by enter_phase on resume, from the restored handles).
    text_cache: TextCache | None = None


def say_info(setup: Setup, text: str) -> None:
    """An info message, on the main process only."""
    if setup.accelerator.is_main_process:
        setup.report({"kind": "message", "level": "info", "text": text})
