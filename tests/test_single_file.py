"""Single-file checkpoints: family detection from key names and clear errors (no weights here)."""

import pytest
import torch
from safetensors.torch import save_file

from lowmcgm.errors import UserError
from lowmcgm.models import load_base_model
from lowmcgm.single_file import SD1_TEXT_KEY, SD2_TEXT_KEY, UNET_KEY, detect_family


def _fake(path, *keys):
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


def test_family_detection(tmp_path):
    assert detect_family(_fake(tmp_path / "a.safetensors", UNET_KEY, SD1_TEXT_KEY)) == "sd15"
    assert detect_family(_fake(tmp_path / "b.safetensors", UNET_KEY, SD2_TEXT_KEY)) == "sd21"
    with pytest.raises(UserError, match="not a Stable Diffusion checkpoint"):
        detect_family(_fake(tmp_path / "c.safetensors", "lora_unet_x.lora_down.weight"))
    with pytest.raises(UserError, match="no SD 1.x or 2.x text encoder"):
        detect_family(_fake(tmp_path / "d.safetensors", UNET_KEY))


def test_missing_tokenizer_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _fake(tmp_path / "model.safetensors", UNET_KEY, SD1_TEXT_KEY)
    with pytest.raises(UserError, match="tokenizer for model.safetensors was not found"):
        load_base_model(str(path))


def test_config_must_match_the_family(tmp_path):
    path = _fake(tmp_path / "model.safetensors", UNET_KEY, SD1_TEXT_KEY)
    with pytest.raises(UserError, match="SD 1.x checkpoint"):
        load_base_model(str(path), single_file_config="sd21-768")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(UserError, match="not a safetensors file"):
        load_base_model(str(path))
