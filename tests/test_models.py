"""Loading base models: the tiny builders, a diffusers folder, clear errors for everything else."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig

from lowmcgm.errors import UserError
from lowmcgm.models.configs import config_folder
from lowmcgm.models.folder import save_base_model
from lowmcgm.models.loading import load_base_model
from lowmcgm.models.tiny import TEXT_SIZE_KEYS, TINY_REAL_CONFIGS, UNET_SIZE_KEYS, VAE_SIZE_KEYS, build_tiny_base
from lowmcgm.models.tokenizer import build_sd_tokenizer


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


# What a tiny model may change of its real config: sizes only (models.*_SIZE_KEYS), plus the
# fields transformers writes about itself. Every other field is the real model's, quirks included.
TEXT_BOOKKEEPING = {"architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"}


def _real_json(real: str, path: str) -> dict:
    return json.loads((config_folder(real) / path).read_text())


def _real_as_built(real: str, component: str) -> dict:
    """The real config as the class that loads it reads it (its defaults filled in, no weights)."""
    raw = _real_json(real, f"{component}/config.json")
    if component.startswith("text_encoder"):
        return CLIPTextConfig(**{k: v for k, v in raw.items() if k not in TEXT_BOOKKEEPING}).to_dict()
    cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
    with torch.device("meta"):
        return dict(cls.from_config(raw).config)


def _norm(value):
    """Lists and tuples compare alike (JSON has only lists)."""
    return list(value) if isinstance(value, (list, tuple)) else value


@pytest.mark.parametrize("name", ["tiny", "tiny-v", "tiny-xl"])
def test_tiny_configs_are_the_real_ones_with_smaller_sizes(name):
    tiny, real = build_tiny_base(name), TINY_REAL_CONFIGS[name]
    parts = {"unet": (dict(tiny.unet.config), UNET_SIZE_KEYS), "vae": (dict(tiny.vae.config), VAE_SIZE_KEYS),
             "text_encoder": (tiny.text_encoder.config.to_dict(), TEXT_SIZE_KEYS)}
    if tiny.text_encoder_2 is not None:
        parts["text_encoder_2"] = (tiny.text_encoder_2.config.to_dict(), TEXT_SIZE_KEYS)
    for component, (ours, size_keys) in parts.items():
        theirs = _real_as_built(real, component)
        differ = {k for k in set(ours) | set(theirs)
                  if not k.startswith("_") and k not in TEXT_BOOKKEEPING and _norm(ours.get(k)) != _norm(theirs.get(k))}
        assert differ <= set(size_keys), f"{name} {component}: non-size fields differ: {sorted(differ - set(size_keys))}"
    if name == "tiny-xl":
        assert tiny.text_encoder_2.config.eos_token_id == 2  # SDXL's legacy id, which pools at the highest id
    # The schedule is the real one's: every field of its scheduler config that DDPM has.
    schedule = dict(tiny.noise_scheduler.config)
    for key, value in _real_json(real, "scheduler/scheduler_config.json").items():
        if key in schedule and not key.startswith("_"):  # not who wrote it
            assert _norm(schedule[key]) == _norm(value), key
    # Each tokenizer pads with the real one's token, to its length; <|endoftext|> is the highest id
    # of the vocabulary, as in CLIP's (what argmax pooling relies on).
    for sub, tokenizer in (("tokenizer", tiny.tokenizer), ("tokenizer_2", tiny.tokenizer_2)):
        if tokenizer is not None:
            real_tokenizer = build_sd_tokenizer(real, sub)
            assert tokenizer.convert_ids_to_tokens(tokenizer.pad_token_id) == real_tokenizer.convert_ids_to_tokens(
                real_tokenizer.pad_token_id)
            assert tokenizer.model_max_length == real_tokenizer.model_max_length
            assert tokenizer.eos_token_id == max(tokenizer.get_vocab().values())
