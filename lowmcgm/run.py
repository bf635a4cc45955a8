"""Train, then sample, on one loaded base model: what ``lowmcgm run`` and ``lowmcgm demo`` do.

Everything is checked before the weights load (photo, masks, output folder, prompts, poses and
sampling settings against the handles to be trained), and what needs the model (handles within
the token window, pose masks the crop keeps) right after it loads, before any step: a bad pose
fails in seconds, not after training. ``train()`` leaves the base as it came, and sampling
installs the artifact it wrote on that same base (``MCGMState.from_artifact``), so the images are
those ``lowmcgm sample`` draws from the file, with one load of the base model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

from lowmcgm.models import loading  # the module, not its function: a test replaces the loader
from lowmcgm.config import Config, SampleSettings
from lowmcgm.handles import check_handle_names
from lowmcgm.runs.folder import hold_folder
from lowmcgm.sampling.previews import save_loss_curve
from lowmcgm.sampling.checks import check_on_base, plan_sampling
from lowmcgm.sampling.prompts import PoseSource, PromptSpec, no_mask_reason, training_prompt_spec
from lowmcgm.sampling.sampler import sample_artifact
from lowmcgm.sampling.training_previews import TrainingPreviews
from lowmcgm.training.trainer import check_inputs, train

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RunResult:
    """Where ``train_then_sample`` put its outputs."""

    artifact: Path
    previews: Path
    loss_curve: Path
    grid: Path


def train_then_sample(cfg: Config, specs: list[PromptSpec], poses: dict[str, PoseSource], settings: SampleSettings, *,
                      resume: bool = False, overwrite: bool = False, on_progress: ProgressFn | None = None,
                      guard: Callable[[str], ContextManager[Any]] | None = None) -> RunResult:
    """Train ``cfg``, then sample ``specs`` (the training prompt when empty) into ``<out>/samples``.

    Args:
        cfg: a validated training configuration.
        specs, poses, settings: what to sample, as ``lowmcgm sample`` takes them.
        resume, overwrite: as for ``train``.
        on_progress: receives the trainer's and the sampler's events.
        guard: ``guard("train")`` / ``guard("sample")`` wrap each stage (the CLI turns CUDA's
            out-of-memory error into advice there); None wraps nothing.

    Returns:
        The artifact, previews folder, loss curve and contact sheet paths.
    """
    guard = guard or (lambda stage: contextlib.nullcontext())
    handles = check_handle_names(list(cfg.data.handles), len(cfg.data.masks))
    reason = no_mask_reason(settings, trained_with_mask_tokens=cfg.loss.use_mask_tokens)
    if not specs:  # the training prompt, each handle posed by its own training mask
        specs = [training_prompt_spec(handles, [] if reason else list(cfg.data.masks))]
    # Settings, prompts and poses are checked against the handles to be trained before any weights load.
    plans = plan_sampling(specs, poses, handles, settings, reason)
    out = Path(cfg.output.out).expanduser()
    with hold_folder(out):
        check_inputs(cfg, resume, overwrite)  # photo, masks, output folder (train repeats it)
        previews = TrainingPreviews(out / "previews", plans[0], settings, cfg.train.phase1_steps)
        base = loading.load_base_model(cfg.model.base_model, cfg.model.single_file_config)
        # What sampling would refuse on this base fails now, not after training (no report: the
        # warnings of cut prompts come once, when sampling plans them again).
        size = cfg.model.resolution or base.resolution  # what sampling draws at unless --height/--width
        check_on_base(plans, base, settings.height or size, settings.width or size)
        with guard("train"):
            artifact = train(cfg, on_progress=on_progress, resume=resume, base=base, on_preview=previews,
                             overwrite=overwrite)
        save_loss_curve(out / "loss_history.json", out / "loss_curve.png")
        with guard("sample"):  # samples of the run this one continues or replaces give way
            grid = sample_artifact(artifact, specs, poses, settings, out / "samples", base=base,
                                   report=on_progress, overwrite=True)
    return RunResult(artifact, out / "previews", out / "loss_curve.png", grid)
