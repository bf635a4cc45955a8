"""`lowmcgm estimate` end to end on the tiny model: JSON figures in bytes, the search for settings
that fit a card too small for it, and user errors (exit code 2). The text report is tested in
test_estimate.py (format_estimate)."""

from __future__ import annotations

import json

import pytest

from lowmcgm.memory import trace as mt
from lowmcgm.cli import main

PARTS = {"frozen_weights", "trainable_weights", "optimizer_state", "other_resident", "gradients", "activations",
         "transient"}


@pytest.fixture
def single_threaded_children(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    if mt.torch_is_gpu_build():
        pytest.skip("fake-CUDA tracing is exercised on CPU builds")


def test_json_figures_and_settings_that_fit_a_small_card(single_threaded_children, capsys):
    # The tiny model's phase 2 peaks near 20 MB: a card of 0.61 GiB leaves it about 11 MiB after the
    # margin, which gradient checkpointing reaches (the tiny-cpu preset has it off).
    assert main(["estimate", "--preset", "tiny-cpu", "--base-model", "tiny", "--json", "--card", "0.61",
                 "--set", "lora.rank=8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "tiny" and data["resolution"] == 64 and data["config"]["lora"]["rank"] == 8
    assert [p["phase"] for p in data["phases"]] == [1, 2]
    for phase in data["phases"]:
        assert set(phase["parts"]) == PARTS
        assert sum(phase["parts"].values()) == phase["peak_bytes"] > 0
    assert data["peak_bytes"] == max(max(p["peak_bytes"], p["setup_peak_bytes"]) for p in data["phases"])
    assert data["fits_gib"] == [4, 6, 8, 10, 12, 16, 24]
    assert data["card_gib"] == 0.61 and data["fits_card"] is False
    fixes = data["suggestions"]
    assert fixes and fixes[0]["overrides"] == {"model.use_gradient_checkpointing": True}
    assert all(f["required_card_bytes"] <= 0.61 * 2**30 for f in fixes)


def test_sdxl_estimate_states_the_attention_maps_and_refuses_what_sdxl_does_not_train(single_threaded_children,
                                                                                     capsys):
    assert main(["estimate", "--preset", "tiny-cpu", "--base-model", "tiny-xl"]) == 0
    out = capsys.readouterr().out
    assert "tiny-xl at 64 px" in out
    assert "the attention losses read 16x16 maps (latent side / 2, derived from the model)" in out
    assert main(["estimate", "--preset", "8gb", "--base-model", "sdxl-base"]) == 2
    err = capsys.readouterr().err
    assert "is an SDXL model: train.use_prior_preservation is not supported" in err and "sdxl-8gb" in err


@pytest.mark.parametrize("args,fragment", [
    (["--base-model", "/no/such/folder"], "sd15"),
    (["--base-model", "tiny", "--resolution", "100"], "multiple of 8"),
    (["--base-model", "tiny", "--set", "lora.rnak=4"], "lora.rank"),
    (["--base-model", "tiny", "--preset", "9gb"], "Unknown preset"),
], ids=["missing-folder", "resolution", "unknown-key", "unknown-preset"])
def test_user_errors_exit_2(capsys, args, fragment):
    assert main(["estimate"] + args) == 2
    assert fragment in capsys.readouterr().err
