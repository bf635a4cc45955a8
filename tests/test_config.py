"""Config: typed overrides, unknown keys with suggestions, validation, TOML round trip."""

import pytest

from lowmcgm.config import (Config, all_keys, apply_overrides, config_from_dict, config_to_dict, load_toml,
                            parse_set, resolve_config, to_toml, validate)
from lowmcgm.errors import UserError


def test_overrides_are_typed_by_the_field():
    cfg = apply_overrides(Config(), {"train.lora_lr": "3e-4", "lora.rank": "8", "model.use_xformers": "true",
                                     "data.masks": "a.png,b.png"}, "test")
    assert cfg.train.lora_lr == 3e-4 and cfg.lora.rank == 8 and cfg.model.use_xformers is True
    assert cfg.data.masks == ("a.png", "b.png")
    assert Config().lora.rank == 4  # the original is untouched (frozen, copied)


@pytest.mark.parametrize("key,value,fragment", [
    ("train.lora_rl", "1", "Did you mean 'train.lora_lr'"),
    ("trian.lora_lr", "1", "Did you mean 'train.lora_lr'"),
    ("lora.rank", "four", "takes a int"),
    ("lora.rank", "2.5", "takes a int"),
    ("model.use_xformers", "maybe", "takes a bool"),
], ids=["typo-name", "typo-section", "not-int", "float-for-int", "not-bool"])
def test_bad_overrides(key, value, fragment):
    with pytest.raises(UserError, match=fragment):
        apply_overrides(Config(), {key: value}, "test")


def test_validate_lists_every_problem():
    cfg = apply_overrides(Config(), {"lora.rank": 0, "model.mixed_precision": "fp8", "data.flip_p": 2.0}, "t")
    with pytest.raises(UserError) as info:
        validate(cfg)
    text = str(info.value)
    assert "lora.rank" in text and "mixed_precision" in text and "flip_p" in text


def test_set_syntax():
    assert parse_set(["a.b=1", "c.d = x"]) == {"a.b": "1", "c.d": "x"}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_set(["novalue"])


def test_toml_round_trip(tmp_path):
    cfg = resolve_config("8gb", None, {"data.masks": ["a.png"], "train.seed": 7})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    again = resolve_config(None, str(path), {})
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_precedence_preset_then_file_then_cli(tmp_path):
    path = tmp_path / "user.toml"
    path.write_text("[lora]\nrank = 12\n[train]\nseed = 3\n")
    cfg = resolve_config("8gb", str(path), {"train.seed": "5"})
    assert cfg.lora.use_text_encoder_lora is True  # from the preset
    assert cfg.lora.rank == 12  # the file beats the preset
    assert cfg.train.seed == 5  # the command line beats the file


def test_bad_toml_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_toml(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[train]\nlearning_rate = 1\n")
    with pytest.raises(UserError, match="Unknown config key 'train.learning_rate'"):
        resolve_config(None, str(unknown), {})


def test_every_key_is_listed():
    keys = all_keys()
    assert "train.lora_lr" in keys and "loss.mask_attn_weight" in keys and len(keys) == len(set(keys))
