"""training/recipe.py: the recipe owns a run; its set-up is frozen, its state goes on from phase to phase."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowmcgm.config import resolve_config
from lowmcgm.handles import default_handles
from lowmcgm.models.tiny import build_tiny_base
from lowmcgm.runs.signals import Interrupted
from lowmcgm.training.optimizer import ADAMW
from lowmcgm.training.recipe import TrainingRecipe
from lowmcgm.training.trainer import build_setup


def _recipe(photo, tmp_path, **overrides) -> TrainingRecipe:
    image, a, b = photo
    cfg = resolve_config("tiny-cpu", None, {"data.image": image, "data.masks": [a, b], "output.out": str(tmp_path),
                                            "train.phase1_steps": 2, "train.phase2_steps": 2} | overrides)
    events = []
    setup = build_setup(cfg, build_tiny_base("tiny"), default_handles(2), events.append, ADAMW)
    recipe = TrainingRecipe(setup, tmp_path)
    recipe.events = events
    return recipe


def test_the_set_up_is_frozen(photo, tmp_path):
    recipe = _recipe(photo, tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.setup.store = None


def test_phase_2_goes_on_with_phase_1s_generator_and_history_and_adds_the_adapters(photo, tmp_path):
    recipe = _recipe(photo, tmp_path)
    first = recipe.enter_phase(1)
    assert not recipe.setup.mcgm.unet_params
    losses = [recipe.step(), recipe.step()]
    assert first.step == 2 and [h["step"] for h in first.history] == [1, 2]
    assert first.history[1]["total"] == losses[1]["total"]
    second = recipe.enter_phase(2)
    assert second is recipe.state and second is not first
    assert (second.phase, second.step) == (2, 0)
    assert second.generator is first.generator and second.history is first.history
    assert recipe.setup.mcgm.unet_params  # LoRA arrives with phase 2
    trained = {id(p) for group in second.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in recipe.setup.mcgm.unet_params} <= trained


def test_a_phase_that_trains_nothing_in_the_text_encoder_keeps_its_encodings_in_the_state(photo, tmp_path):
    recipe = _recipe(photo, tmp_path, **{"train.phase2_handle_lr": 0.0, "lora.use_text_encoder_lora": False})
    assert recipe.enter_phase(1).text_cache is None
    cache = recipe.enter_phase(2).text_cache
    # Two handles: "<asset0>", "<asset1>" and both orders of the pair.
    assert cache is not None and len(cache) == 4
    assert next(recipe.setup.base.text_encoder.parameters()).device == torch.device("cpu")
    assert any("prompts encoded once" in e.get("text", "") for e in recipe.events)
    recipe.step()  # trains from the cache


def test_a_stop_request_stops_between_steps_and_the_interrupted_run_saves_a_checkpoint(photo, tmp_path):
    recipe = _recipe(photo, tmp_path)
    recipe.enter_phase(1)
    recipe.step()
    recipe.stop_requested = 2  # as the first SIGINT sets it
    with pytest.raises(Interrupted):
        recipe.train()
    assert recipe.state.step == 1  # no step after the request
    saved = [e for e in recipe.events if e["kind"] == "saved"]
    assert saved and saved[0]["what"] == "checkpoint" and (tmp_path / "checkpoints" / "last.safetensors").is_file()
