"""The checks before sampling, in one order, for ``lowmcgm sample``, ``lowmcgm run`` and the web page.

Two halves. ``plan_sampling`` needs no weights: the settings, then the prompts and poses against
the handles (pose files are read here), so a bad pose fails in a second, before a model loads or
training starts. ``check_on_base`` needs the loaded base: the handles within its token window, the
size it draws at, and each pose's centre crop at that size. ``sample_artifact`` runs both (the page
and ``lowmcgm sample`` go through it); ``run`` runs them before training as well, so nothing it
would refuse after training is found out hours late.
"""

from __future__ import annotations

import torch

from lowmcgm.config import SampleSettings, field_flag, sample_problems
from lowmcgm.errors import UserError
from lowmcgm.models.base import BaseModel
from lowmcgm.models.fit import check_sample_size
from lowmcgm.sampling.prompts import (PlannedPrompt, PoseSource, ProgressFn, PromptSpec, check_plans_fit,
                                      check_pose_crops, plan_prompts)


def check_settings(settings: SampleSettings) -> None:
    """Refuse impossible sampling settings with one UserError listing all problems, each named by its flag.

    The CLI has checked them with its configuration already (``config.validate``); this is for
    library callers, and for what depends on the machine.
    """
    problems = sample_problems(settings, field_flag)
    if settings.use_cpu_offload and not torch.cuda.is_available():
        problems.append("--cpu-offload moves models between the CPU and a CUDA GPU, and there is no CUDA GPU here")
    if problems:
        raise UserError("Invalid sampling settings: " + "; ".join(problems) + ".")


def plan_sampling(specs: list[PromptSpec], poses: dict[str, PoseSource], handles: list[str], settings: SampleSettings,
                  no_masks_because: str | None) -> list[PlannedPrompt]:
    """Before any weights load: check ``settings``, then plan ``specs`` with their poses.

    Args:
        handles: the artifact's handles (or, for ``run``, those the run will train).
        no_masks_because: ``prompts.no_mask_reason``'s answer: why no mask tokens are appended.
    """
    check_settings(settings)
    return plan_prompts(specs, poses, handles, no_masks_because, guided=settings.pose_guidance != "none")


def check_on_base(plans: list[PlannedPrompt], base: BaseModel, height: int, width: int,
                  report: ProgressFn | None = None) -> None:
    """Once ``base`` is loaded: handles within its token window (warning of cut prompts through
    ``report``), the size ``height`` x ``width`` it is to draw at, and each pose's crop to it."""
    check_plans_fit(plans, base, report)
    check_sample_size(base, height, width)
    check_pose_crops(plans, height, width)
