"""What to do when CUDA runs out of memory: the estimate of the failed settings, the card's size
and the shipped preset made for it (training), or the sampling options that lower the peak."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from lowmcgm.errors import UserError


SAMPLING_OOM = ("CUDA ran out of memory while sampling: try --vae-slicing (or --vae-tiling for large images), "
                "--batch-size 1, smaller --height/--width, --dtype fp16, or --cpu-offload on a 4-6 GB card.")


# An out-of-memory message waits at most this long for the estimate of the failed settings.
OOM_ESTIMATE_TIMEOUT_S = 120


def training_oom_message(cfg: Any, preset: str | None) -> str:
    """What to do when training ran out of CUDA memory: the estimate for these settings, the card's
    size and the shipped preset made for it. Each figure is a bonus: the message survives without.

    Args:
        cfg: the training run's config (its model is traced for the estimate).
        preset: the ``--preset`` the run used, if any; a smaller ``<n>gb`` preset is suggested.

    Returns:
        The error a training command (``train``, ``run``) stops with, as a ``UserError`` message.
    """
    figures = ""
    try:  # lowmcgm.memory.estimate traces these settings on fake CUDA tensors in a subprocess (~20 s)
        from lowmcgm.memory.estimate import estimate, required_card_bytes

        est = estimate(cfg, cfg.model.base_model, timeout_s=OOM_ESTIMATE_TIMEOUT_S)
        figures = (f" By 'lowmcgm estimate', these settings peak at {est.peak_bytes / 2**30:.1f} GiB and need a "
                   f"card of {required_card_bytes(est.peak_bytes) / 2**30:.1f} GiB.")
    except Exception:  # a model the estimator cannot read (single file, hub id), a failed trace, ...
        figures = ""
    card = ""
    try:
        import torch

        from lowmcgm.memory.estimate import card_of_preset, preset_group
        from lowmcgm.presets import list_presets

        card_gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        # The card presets of the run's family (sdxl-<n>gb for an SDXL run, <n>gb otherwise) below
        # the run's own; a card sold as 8 GB reports a little under 8 GiB: allow half a GiB.
        own, group = card_of_preset(preset) or float("inf"), preset_group(preset or "")
        fitting = sorted((size, name) for name in list_presets() if preset_group(name) == group
                         and (size := card_of_preset(name)) and size <= card_gib + 0.5 and size < own)
        card = f" This card has {card_gib:.1f} GiB" + (f": try --preset {fitting[-1][1]}." if fitting else ".")
    except Exception:  # no CUDA to ask (the error was raised elsewhere), or no presets folder
        card = ""
    return ("CUDA ran out of memory during training with these settings." + figures + card + " Memory drops "
            "with a smaller preset (lowmcgm presets; lowmcgm estimate checks one before training), "
            "train.batch_size=1, model.use_gradient_checkpointing=true, train.optimizer=adamw8bit and a lower "
            "model.resolution; close other programs that use the GPU. Changed settings need a new --out "
            "(a checkpoint resumes only with the same settings, precision and learning rates aside).")


@contextlib.contextmanager
def out_of_memory_advice(cfg: Any = None, preset: str | None = None) -> Iterator[None]:
    """Turn CUDA's out-of-memory error into a UserError saying what fits (training with ``cfg``, else sampling)."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise UserError(training_oom_message(cfg, preset) if cfg is not None else SAMPLING_OOM) from exc
