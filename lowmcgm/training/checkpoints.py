"""Resume checkpoints: writing them during training, checking and restoring them on ``--resume``.

A checkpoint holds everything ``TrainState`` holds (phase, step, optimizer moments, the batch
generator's state, the loss history) plus the trained weights (``MCGMState.state_dict``) and the
run's configuration, in one safetensors file (``artifact.save_checkpoint``). It is written under a
temporary name and renamed, never with a NaN weight, so the last good one survives any crash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lowmcgm import config as config_mod
from lowmcgm.artifact import load_checkpoint, read_header, save_checkpoint
from lowmcgm.config import Config
from lowmcgm.errors import UserError
from lowmcgm.runs.folder import CHECKPOINT_NAME
from lowmcgm.runs.identity import check_same_base, describe, input_fingerprints, resume_differences
from lowmcgm.runs.write_guard import remove_stale_temporaries
from lowmcgm.training.optimizer import ADAMW, OPTIMIZER_TITLES, optimizer_of_state
from lowmcgm.training.phases import enter_phase
from lowmcgm.training.state import Setup, TrainState


# What may change on --resume besides paths: step counts (to extend a run), the checkpoint interval,
# and the two fixes a NaN/inf loss asks for (precision, learning rates), so the last good checkpoint
# continues with them. Trainable weights and optimizer states are fp32 whatever the precision. The
# optimizer settings may change too: what must match is the optimizer the checkpoint's run trained
# with (8-bit may have fallen back to torch AdamW there), checked against the one built now.
_RESUME_MAY_CHANGE = {"model": ("base_model", "mixed_precision"),
                      "train": ("phase1_steps", "phase2_steps", "checkpoint_every", "handle_lr", "mask_encoder_lr",
                                "phase2_handle_lr", "phase2_mask_encoder_lr", "lora_lr", "text_encoder_lr",
                                "optimizer", "use_adamw_fallback")}


def save_train_checkpoint(setup: Setup, state: TrainState, out: Path) -> Path:
    """Write ``<out>/checkpoints/last.safetensors`` (refused if a weight is NaN/inf)."""
    path = out / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"phase": state.phase, "step": state.step, "generator": state.generator.get_state().tolist(),
            "history": state.history, "config": config_mod.config_to_dict(setup.cfg), "inputs": setup.inputs,
            "base_model": setup.base.name, "base_model_hash": setup.base.config_hash,
            "optimizer": setup.optimizer_name}
    weights = setup.mcgm.state_dict(setup.base)
    check_finite(setup, state, weights)  # a NaN weight must never replace the last good checkpoint
    save_checkpoint(path, weights, state.optimizer.state_dict(), info)
    return path


def resume_state(setup: Setup, out: Path) -> TrainState:
    """Rebuild the TrainState from the last checkpoint (weights, optimizer, generator, history)."""
    path = check_resume(setup.cfg, out)
    for folder in (out, path.parent):  # half-written files of the run that was killed
        remove_stale_temporaries(folder)
    weights, optimizer_state, info = load_checkpoint(path)
    phase, step = info["phase"], info["step"]
    if phase == 1 and step >= setup.cfg.train.phase1_steps:
        phase, step = 2, 0
    generator = torch.Generator()
    generator.set_state(torch.tensor(info["generator"], dtype=torch.uint8))
    loads_optimizer = step > 0 or info["phase"] == phase  # else the next phase starts with a fresh one
    if loads_optimizer:
        check_same_optimizer(info.get("optimizer") or optimizer_of_state(optimizer_state), setup.optimizer_name, path)
    state = enter_phase(setup, phase, generator, info["history"], weights)
    state.step = step
    if loads_optimizer:
        rates = [group["lr"] for group in state.optimizer.param_groups]
        state.optimizer.load_state_dict(optimizer_state)
        for group, lr in zip(state.optimizer.param_groups, rates):  # the stored ones would win otherwise
            group["lr"] = lr
    return state


def check_same_optimizer(written_by: str | None, building: str, path: Path) -> None:
    """Refuse to load one AdamW's state into the other (``written_by`` None: no state to load)."""
    if written_by is None or written_by == building:
        return
    fix = ("resume with --set train.optimizer=adamw" if written_by == ADAMW else
           "resume where bitsandbytes runs, with train.optimizer = 'adamw8bit'")
    raise UserError(f"--resume: {path} was written by {OPTIMIZER_TITLES[written_by]}, but this run would train with "
                    f"{OPTIMIZER_TITLES[building]} and their states do not convert: {fix}, or start again with "
                    "--overwrite.")


def training_identity(cfg: Config) -> dict[str, Any]:
    """Settings that must match for a resume to continue the same run (see ``_RESUME_MAY_CHANGE``)."""
    data = config_mod.config_to_dict(cfg)
    data.pop("output")
    data.pop("sample")  # how `run` samples afterwards changes nothing trained
    for section, keys in _RESUME_MAY_CHANGE.items():
        for key in keys:
            data[section].pop(key)
    return data


def check_resume(cfg: Config, out: Path) -> Path:
    """The checkpoint ``--resume`` continues from, refused unless its settings match (header only)."""
    path = out / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path} (the run stopped before writing one); start again "
                        f"without --resume, adding --overwrite if {out} holds files of that run.")
    _, meta = read_header(path)
    try:
        info = json.loads(meta["info"])
        stored = config_mod.config_from_dict(info["config"])
    except (KeyError, TypeError, ValueError, UserError) as exc:
        raise UserError(f"--resume: {path} is not a lowmcgm checkpoint this version can read.") from exc
    differences = resume_differences(training_identity(stored), training_identity(cfg), info.get("inputs"),
                                     input_fingerprints(cfg), cfg)
    if differences:
        raise UserError(f"--resume: the checkpoint in {out} was made with other settings or inputs: "
                        f"{describe(differences)}; resume with the same ones (see {out / 'config.toml'}) or start "
                        "a new run with --overwrite or another --out.")
    return path


def check_resume_base(out: Path, base: Any) -> None:
    """Refuse, once the base model is loaded and before anything is written, a base of another
    architecture than the checkpoint's run (its weights would not load)."""
    path = out / CHECKPOINT_NAME
    _, meta = read_header(path)
    check_same_base(json.loads(meta["info"]), base, path)


def check_finite(setup: Setup, state: TrainState, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse NaN/inf weights with the advice of ``nan_message``."""
    bad = next((name for name, value in tensors.items() if not torch.isfinite(value).all()), None)
    if bad is not None:
        raise UserError(nan_message(setup, state, f"the weight {bad} became NaN/inf after step {state.step}"))


def nan_message(setup: Setup, state: TrainState, what: str = "") -> str:
    """One line on a NaN/inf: where, the likely cause, the fix, and what the last checkpoint keeps."""
    what = what or f"the loss became NaN/inf at step {state.step + 1}"
    checkpoint = Path(setup.cfg.output.out) / CHECKPOINT_NAME
    kept = (f"the last good checkpoint is kept in {checkpoint} (--resume continues from it with the same "
            "settings; a changed setting needs a new --out)" if checkpoint.is_file() else
            "no checkpoint had been written yet")
    return (f"Training stopped: {what} of phase {state.phase} (mixed precision: "
            f"{setup.accelerator.mixed_precision}). Likely an fp16 overflow (in the UNet or the VAE) or too "
            "high a learning rate: use --set model.mixed_precision=bf16 (or no, for fp32 weights and VAE), "
            f"or lower train.lora_lr / train.handle_lr; {kept}.")
