"""lowmcgm.run.train_then_sample as a library call: objects in, the run's files out."""

from __future__ import annotations

import json

import pytest

from lowmcgm.config import SampleSettings, resolve_config
from lowmcgm.errors import UserError
from lowmcgm.run import train_then_sample
from lowmcgm.sampling.prompts import PromptSpec

FAST = SampleSettings(num_images=1, steps=2, dtype="fp32", pose_guidance="attention")


def _cfg(photo, out):
    image, a, b = photo
    return resolve_config("tiny-cpu", None, {"model.base_model": "tiny", "data.image": image, "data.masks": [a, b],
                                             "output.out": str(out), "train.phase1_steps": 2,
                                             "train.phase2_steps": 2, "train.checkpoint_every": 0})


def test_train_then_sample_writes_artifact_previews_curve_and_grid(photo, tmp_path):
    events = []
    result = train_then_sample(_cfg(photo, tmp_path / "run"), [PromptSpec("a photo of <asset1> on grass")],
                               {"<asset1>": photo[2]}, FAST, on_progress=events.append)
    assert result.artifact.is_file() and result.loss_curve.is_file() and result.grid.is_file()
    assert any(result.previews.glob("step*.png"))
    index = json.loads((result.grid.parent / "samples.json").read_text())
    assert index["prompts"][0]["poses"] == {"<asset1>": photo[2]}
    assert index["settings"]["pose_guidance"] == "attention"
    assert {e["kind"] for e in events} >= {"step", "saved"}


def test_a_pose_for_an_unknown_handle_fails_before_anything_is_written(photo, tmp_path):
    with pytest.raises(UserError, match="no such handle"):
        train_then_sample(_cfg(photo, tmp_path / "run"), [PromptSpec("a photo of <asset0>")],
                          {"<asset7>": photo[1]}, FAST)
    assert not (tmp_path / "run").exists()
