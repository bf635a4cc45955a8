"""Config: typed overrides, unknown keys with suggestions, validation, TOML round trip."""

import pytest

from lowmcgm.config import (Config, all_keys, apply_overrides, config_field, config_from_dict, config_to_dict,
                            load_toml, parse_set, resolve_config, to_toml, validate)
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


# ------------------------------------------------------------------------------------------------
# [sample]: sampling settings come from the same files, --set and flags as every other section
# ------------------------------------------------------------------------------------------------

def test_sample_section_from_a_preset_file_round_trips(tmp_path):
    preset = tmp_path / "fast-sampling.toml"
    preset.write_text('# sampling in a hurry\n[sample]\nsteps = 12\nscheduler = "ddim"\nuse_vae_slicing = true\n')
    cfg = resolve_config(str(preset), None, {})
    assert (cfg.sample.steps, cfg.sample.scheduler, cfg.sample.use_vae_slicing) == (12, "ddim", True)
    assert cfg.sample.guidance_scale == 7.5  # what the file leaves out keeps its default
    assert "[sample]" in to_toml(cfg) and config_from_dict(config_to_dict(cfg)) == cfg


def test_set_reaches_sample_keys_typed_by_the_field():
    cfg = resolve_config(None, None, {"sample.steps": "7", "sample.use_cpu_offload": "true",
                                      "sample.guidance_scale": "3"})
    assert (cfg.sample.steps, cfg.sample.use_cpu_offload, cfg.sample.guidance_scale) == (7, True, 3.0)


def test_a_flag_beats_set_which_beats_the_files(tmp_path):
    preset, user = tmp_path / "preset.toml", tmp_path / "user.toml"
    preset.write_text("[sample]\nsteps = 12\nseed = 1\nnum_images = 2\n")
    user.write_text("[sample]\nsteps = 13\nseed = 2\n")
    cfg = resolve_config(str(preset), str(user), {"sample.steps": "14"}, {"sample.steps": 5})
    assert (cfg.sample.steps, cfg.sample.seed, cfg.sample.num_images) == (5, 2, 2)
    assert resolve_config(str(preset), str(user), {"sample.steps": "14"}).sample.steps == 14


@pytest.mark.parametrize("overrides,flags,fragment", [
    ({"sample.steps": "0"}, {}, "sample.steps must be between 1 and 1000 (got 0)"),
    ({}, {"sample.steps": 0}, "--steps must be between 1 and 1000 (got 0)"),
    ({"sample.scheduler": "fast"}, {}, "sample.scheduler must be one of ddim, euler_a, dpmpp_2m (got 'fast')"),
    ({"sample.dtype": "fp8"}, {}, "sample.dtype must be one of fp16, bf16, fp32 or empty (got 'fp8')"),
    ({"sample.steps": "4"}, {"sample.pose_guidance_steps": 9}, "--guidance-steps must be between 0 and sample.steps"),
    ({}, {"model.resolution": 100}, "--resolution must be a multiple of 8 (got 100)"),
], ids=["key-out-of-bounds", "flag-out-of-bounds", "bad-choice", "bad-choice-with-empty", "bound-by-another-key",
        "train-flag"])
def test_problems_name_the_flag_typed_out_else_the_key(overrides, flags, fragment):
    with pytest.raises(UserError, match="Invalid configuration: ") as info:
        resolve_config(None, None, overrides, flags)
    assert fragment in str(info.value)


def test_choices_live_on_their_fields_and_every_default_is_one():
    from lowmcgm.config import CHOICES, config_field

    defaults = config_to_dict(Config())
    for key in all_keys():
        field, _ = config_field(key)
        choices, section, name = field.metadata["choices"], *key.split(".")
        assert not choices or defaults[section][name] in choices, key
        assert CHOICES.get(key, ()) == choices, key


def _limited_keys(kind: str) -> list[str]:
    from lowmcgm.config import config_field

    return [key for key in all_keys() if config_field(key)[0].metadata[kind] is not None]


@pytest.mark.parametrize("limits", [{"bounds": (0, 1), "at_least": 0}, {"at_least": 0, "above": 0},
                                    {"bounds": (0, 1), "below": 1}, {"at_most": 1, "below": 1}],
                         ids=["bounds+at_least", "at_least+above", "bounds+below", "at_most+below"])
def test_a_field_declares_one_limit_per_side(limits):
    from lowmcgm.config.schema import _f

    with pytest.raises(TypeError, match="one (lower|upper) limit per field"):
        _f(0.5, "a number", **limits)
    _f(0.5, "a number", at_least=0, below=1)  # one each side


@pytest.mark.parametrize("key", _limited_keys("at_least"))
def test_every_declared_lower_limit_is_enforced_with_its_fields_words(key):
    from lowmcgm.config import config_field

    field, typ = config_field(key)
    low = field.metadata["at_least"]
    below = typ(low - 1) if typ is int else low - 0.5
    with pytest.raises(UserError) as info:
        resolve_config(None, None, {key: str(below)})
    said = ">= 0" if low == 0 else "positive"
    assert f"{key} must be {said} (got {below})" in str(info.value)


@pytest.mark.parametrize("key", _limited_keys("at_most"))
def test_every_declared_upper_limit_is_enforced(key):
    from lowmcgm.config import config_field

    field, _ = config_field(key)
    high = field.metadata["at_most"]
    with pytest.raises(UserError) as info:
        resolve_config(None, None, {key: str(high + 1)})
    said = f"{high:g}" if isinstance(high, float) else high  # as the messages write a limit: 1, not 1.0
    assert f"{key} must be at most {said} (got {high + 1})" in str(info.value)
    resolve_config(None, None, {key: str(high)} if key != "model.resolution" else {key: str(high - high % 8)})


# Bounded together with another field, so checked in config._sample_checks: image i uses seed + i,
# guided steps are at most sample.steps, and a size is a multiple of 8 up to 2048 (0: the artifact's).
BOUNDED_WITH_OTHER_FIELDS = {"sample.seed", "sample.pose_guidance_steps", "sample.height", "sample.width"}
NUMERIC_KEYS = [key for key in all_keys() if config_field(key)[1] in (int, float)]


@pytest.mark.parametrize("key", NUMERIC_KEYS, ids=NUMERIC_KEYS)
def test_every_number_is_bounded_on_both_sides(key):
    """Issue 23, class C: no numeric setting takes any value (a beta of 1.5, 10^20 steps, alpha -4)."""
    f, typ = config_field(key)
    if key not in BOUNDED_WITH_OTHER_FIELDS:
        m = f.metadata
        assert m["bounds"] or m["at_least"] is not None or m["above"] is not None, f"{key}: no lower bound declared"
        assert m["bounds"] or m["at_most"] is not None or m["below"] is not None, f"{key}: no upper bound declared"
    huge = 10**30 if typ is int else 1e300
    for value in (huge, -huge):
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            validate(apply_overrides(Config(), {key: value}, "test"))
