"""Loading base models: the tiny builders, a diffusers folder, clear errors for everything else."""

import pytest
import torch

from lowmcgm.errors import UserError
from lowmcgm.models import build_tiny_base, load_base_model, save_base_model


def test_tiny_is_deterministic_and_sd_shaped():
    a, b = build_tiny_base("tiny"), build_tiny_base("tiny")
    for (name, p), q in zip(a.unet.named_parameters(), b.unet.parameters()):
        assert torch.equal(p, q), name
    assert a.resolution == 64 and a.prediction_type == "epsilon" and a.version_tag == "sd_v1"
    v = build_tiny_base("tiny-v")
    assert v.prediction_type == "v_prediction" and v.text_width == 48 and v.version_tag == "sd_v2_v"
    assert a.config_hash != v.config_hash


def test_diffusers_folder_round_trip(tmp_path):
    tiny = build_tiny_base("tiny-v")
    save_base_model(tiny, tmp_path / "model")
    loaded = load_base_model(str(tmp_path / "model"))
    assert loaded.config_hash == tiny.config_hash and loaded.prediction_type == "v_prediction"
    assert len(loaded.tokenizer) == len(tiny.tokenizer)
    for p, q in zip(loaded.unet.parameters(), tiny.unet.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("spec,fragment", [
    ("/nonexistent/model", "neither a diffusers folder"),
    ("missing.safetensors", "not found"),
    ("someone/not-cached-model", "not in the local Hugging Face cache"),
    ("weights.ckpt", "never unpickles"),
])
def test_clear_errors(tmp_path, monkeypatch, spec, fragment):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    if spec.endswith(".ckpt"):
        (tmp_path / spec).write_bytes(b"x")
    with pytest.raises(UserError, match=fragment):
        load_base_model(spec)


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(UserError, match="not a Stable Diffusion model folder"):
        load_base_model(str(tmp_path))
