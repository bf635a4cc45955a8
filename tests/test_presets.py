"""Every shipped preset loads, validates and keeps the promises its name makes."""

from pathlib import Path

import pytest

from lowmcgm.config import resolve_config
from lowmcgm.errors import UserError
from lowmcgm.presets import list_presets, preset_path, presets_dir

PRESETS = sorted(p.stem for p in Path(presets_dir()).rglob("*.toml"))


def test_the_expected_presets_ship():
    assert len(PRESETS) == len(list_presets()) >= 6
    assert {"tiny-cpu", "4gb", "6gb", "8gb", "12gb", "reference"} <= set(PRESETS)


def test_presets_are_listed_smallest_card_first():
    names = list(list_presets())
    assert names.index("4gb") < names.index("8gb") < names.index("12gb")  # not "12gb" first, as letters sort
    assert names.index("sdxl-6gb") < names.index("sdxl-8gb") < names.index("sdxl-12gb")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_valid_and_documented(name):
    cfg = resolve_config(name, None, {})
    lines = preset_path(name).read_text().splitlines()
    assert lines[0].startswith("# ") and lines[1].startswith("# lowmcgm ")
    if name not in ("reference", "tiny-cpu", "toy-cpu"):
        assert cfg.model.mixed_precision in ("fp16", "bf16") and cfg.model.use_gradient_checkpointing
        assert cfg.lora.phase2_mode == "lora" and cfg.train.optimizer == "adamw8bit"


def test_reference_is_the_paper_setting():
    cfg = resolve_config("reference", None, {})
    assert cfg.lora.phase2_mode == "full" and cfg.train.lora_lr == 2e-6 and cfg.train.text_encoder_lr == 2e-6
    assert cfg.train.use_prior_preservation


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(UserError, match="Did you mean '8gb'"):
        preset_path("8GB")
