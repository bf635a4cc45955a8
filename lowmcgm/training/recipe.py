"""The training recipe: one run's set-up, its train state, and the loop that drives them.

As torchtune's single-device LoRA recipe (set up, train, save a checkpoint), ``TrainingRecipe`` owns a
run once ``trainer.train`` has checked its inputs and built its ``Setup``: ``enter_phase`` (the
only way a phase begins: ``phases.enter_phase``), ``step``, ``run_phase``, ``save_checkpoint``,
``load_checkpoint``, ``save_artifact`` and ``close``. The set-up never changes; the ``TrainState``
is what a resume restores; the recipe keeps what changes while the run goes on besides it (the
stop signal, the preview hook). Training, resume, ``lowmcgm estimate``'s tracer, the FLOP count
and ``tools/bench_speed.py`` all drive this class.

Example::

    recipe = TrainingRecipe(setup, out)
    recipe.enter_phase(1)          # or recipe.load_checkpoint() to resume
    recipe.train()                 # phase 1, phase 2's adapters, phase 2; Ctrl-C saves a checkpoint
    path = recipe.save_artifact()
    recipe.close()                 # the base computes as loaded again
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from lowmcgm import config as config_mod
from lowmcgm.artifact import save_artifact
from lowmcgm.attention_capture import remove_capture
from lowmcgm.runs.signals import Interrupted, route_stop_signals, signal_name
from lowmcgm.runs.write_guard import write_text_whole
from lowmcgm.training import step as step_module
from lowmcgm.training.checkpointing import release_text_encoder, release_unet
from lowmcgm.training.checkpoints import check_finite, resume_state, save_train_checkpoint
from lowmcgm.training.phases import enter_phase
from lowmcgm.training.state import PreviewFn, Setup, TrainState


class StopNow(Interrupted):
    """A second stop signal: stop at once, mid-step, without writing a (half-updated) checkpoint."""


class TrainingRecipe:
    """One training run: its ``setup`` (built once), its ``state`` (what a resume restores) and the loop.

    Args:
        setup: the run's set-up (``trainer.build_setup``, or the estimate's on fake tensors).
        out: the output folder (checkpoints, the artifact); None where nothing is written (the tracer).
        on_preview: called with the live set-up and state every ``output.preview_every`` steps
            (``lowmcgm run`` samples previews with it); it must leave the models as it found them.
    """

    def __init__(self, setup: Setup, out: Path | None = None, on_preview: PreviewFn | None = None):
        self.setup = setup
        self.out = out
        self.on_preview = on_preview
        self.state: TrainState | None = None
        self.stop_requested = 0  # the stop signal received (SIGINT, SIGTERM, SIGHUP); the loop stops before its next step

    # ------------------------------------------------------------------------------------------
    # The state: phases and checkpoints.

    def enter_phase(self, phase: int) -> TrainState:
        """Begin ``phase`` with a fresh optimizer, going on with this run's generator and history."""
        last = self.state
        # The new state is built while the last one is still referenced, as the memory estimate traces it.
        self.state = enter_phase(self.setup, phase, generator=last.generator if last else None,
                                 history=last.history if last else None)
        return self.state

    def load_checkpoint(self) -> TrainState:
        """Restore the state from ``<out>/checkpoints/last.safetensors`` (``checkpoints.resume_state``)."""
        self.state = resume_state(self.setup, self.out)
        return self.state

    def save_checkpoint(self) -> Path:
        """Write the state to ``<out>/checkpoints/last.safetensors`` (refused if a weight is not finite)."""
        return save_train_checkpoint(self.setup, self.state, self.out)

    # ------------------------------------------------------------------------------------------
    # The loop.

    def step(self) -> dict[str, float]:
        """One training step (``step.train_step``); return its losses, also kept in the history."""
        losses = step_module.train_step(self.setup, self.state)
        self.state.step += 1
        self.state.history.append({"phase": self.state.phase, "step": self.state.step, **losses})
        return losses

    def train(self) -> None:
        """Run what is left of phase 1, then phase 2 (its adapters arrive only then, as in Break-a-scene).

        The first Ctrl-C, SIGTERM or SIGHUP stops at the end of the current step and saves a
        checkpoint (then raises); a second stops at once, without one (``StopNow``).
        """
        setup, report = self.setup, self.setup.report
        try:
            with self._stop_between_steps():
                if self.state.phase == 1:
                    self.run_phase()
                    self.enter_phase(2)  # LoRA arrives only now (a resume inside phase 2 added it already)
                self.run_phase()
        except StopNow:
            report({"kind": "message", "level": "warning", "text": "Stopped mid-step: no checkpoint written; "
                    "--resume continues from the last one."})
            raise
        except KeyboardInterrupt:
            if setup.accelerator.is_main_process:
                report({"kind": "saved", "what": "checkpoint", "path": str(self.save_checkpoint())})
            raise

    def run_phase(self) -> None:
        """The loop: one step, report, maybe checkpoint, maybe preview."""
        setup, state = self.setup, self.state
        cfg, acc, report = setup.cfg, setup.accelerator, setup.report
        total = cfg.train.phase1_steps if state.phase == 1 else cfg.train.phase2_steps
        report({"kind": "phase", "phase": state.phase, "total": total, "start": state.step})
        started, start_step = time.perf_counter(), state.step
        while state.step < total:
            if self.stop_requested:  # a stop signal: stop here, between steps, where the state is whole
                raise Interrupted(self.stop_requested)
            losses = self.step()
            elapsed = time.perf_counter() - started
            rate = (state.step - start_step) / elapsed if elapsed > 0 else 0.0
            report({"kind": "step", "phase": state.phase, "step": state.step, "total": total, "losses": losses,
                    "it_per_s": rate, "eta_s": (total - state.step) / rate if rate else math.inf,
                    "peak_bytes": _peak_memory(setup.device)})
            every = cfg.train.checkpoint_every
            if every and state.step % every == 0 and state.step < total and acc.is_main_process:
                self.save_checkpoint()
            every = cfg.output.preview_every
            if self.on_preview is not None and every and state.step % every == 0 and acc.is_main_process:
                self.on_preview(setup, state)

    @contextlib.contextmanager
    def _stop_between_steps(self) -> Iterator[None]:
        """Turn Ctrl-C, SIGTERM and SIGHUP (``signals.STOP_SIGNALS``) into a stop at the end of the current step.

        A KeyboardInterrupt raised mid-step would leave the random generator advanced by a batch that
        was never trained on, or an optimizer step half applied: the checkpoint saved then would not
        resume to the run it interrupted. So the first signal only sets ``stop_requested`` and
        ``run_phase`` raises ``Interrupted`` between steps; a second one stops at once.
        """
        def on_stop(signum: int, frame: Any) -> None:
            if self.stop_requested:
                raise StopNow(signum)
            self.stop_requested = signum
            self.setup.report({"kind": "message", "level": "info",
                               "text": f"{signal_name(signum)}: stopping after this step to save a checkpoint "
                                       "(Ctrl-C again: stop now, without one)."})

        with route_stop_signals(on_stop):
            yield

    # ------------------------------------------------------------------------------------------
    # The end of the run.

    def save_artifact(self) -> Path:
        """Write the artifact and the loss history (main process); return the artifact's path."""
        setup, state = self.setup, self.state
        path = self.out / setup.cfg.output.artifact_name
        if setup.accelerator.is_main_process:
            artifact = setup.mcgm.to_artifact(setup.base, run_meta(setup))
            check_finite(setup, state, {**artifact.vector_tensors(), **artifact.mask_encoder,
                                        **artifact.unet_lora, **artifact.text_encoder_lora})
            save_artifact(artifact, path, dtype=setup.cfg.output.save_dtype)
            write_text_whole(self.out / "loss_history.json", json.dumps(state.history))
            setup.report({"kind": "saved", "what": "artifact", "path": str(path)})
        setup.accelerator.wait_for_everyone()
        return path

    def close(self) -> None:
        """Leave the base as it came: the trained state, the capture processors and gradient
        checkpointing taken off (``lowmcgm run`` and the page sample on the same base next)."""
        base = self.setup.base
        self.setup.mcgm.remove(base)
        if self.setup.capture is not None:
            remove_capture(base.unet, self.setup.capture)
        release_unet(base.unet)
        base.unet.eval()
        for encoder in base.text_encoders:
            release_text_encoder(encoder)


def run_meta(setup: Setup) -> dict[str, Any]:
    """What the artifact records about the run besides the trained state (``MCGMState.to_artifact``)."""
    cfg, base = setup.cfg, setup.base
    return {"base_model": base.name, "base_model_hash": base.config_hash, "base_model_version": base.version_tag,
            "text_width": base.text_width, "prediction_type": base.prediction_type,
            "resolution": cfg.model.resolution or base.resolution, "init_words": list(cfg.data.init_words),
            "training_config": config_mod.config_to_dict(cfg)}


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
