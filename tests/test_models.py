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


# What a tiny model may change of its real config: sizes only (models.*_SIZE_KEYS), plus the
# fields transformers writes about itself. Every other field is the real model's, quirks included.
TEXT_BOOKKEEPING = {"architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"}


def _real_text_config(real: str, component: str) -> dict:
    """The real text encoder's config as transformers reads it (defaults filled in)."""
    import json

    from transformers import CLIPTextConfig

    from lowmcgm.model_configs import config_folder

    raw = json.loads((config_folder(real) / component / "config.json").read_text())
    return CLIPTextConfig(**{k: v for k, v in raw.items() if k not in TEXT_BOOKKEEPING}).to_dict()


@pytest.mark.parametrize("name", ["tiny", "tiny-v", "tiny-xl"])
def test_tiny_configs_are_the_real_ones_with_smaller_sizes(name):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lowmcgm.model_configs import config_folder
    from lowmcgm.models import TEXT_SIZE_KEYS, TINY_REAL_CONFIGS, UNET_SIZE_KEYS, VAE_SIZE_KEYS

    tiny, real = build_tiny_base(name), TINY_REAL_CONFIGS[name]
    parts = [("unet", tiny.unet, UNET_SIZE_KEYS), ("vae", tiny.vae, VAE_SIZE_KEYS),
             ("text_encoder", tiny.text_encoder, TEXT_SIZE_KEYS)]
    if tiny.text_encoder_2 is not None:
        parts.append(("text_encoder_2", tiny.text_encoder_2, TEXT_SIZE_KEYS))
    for component, module, size_keys in parts:
        if component.startswith("text_encoder"):
            ours, theirs = module.config.to_dict(), _real_text_config(real, component)
        else:  # the real config built on the meta device, so its defaults are filled in as ours are
            cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
            with torch.device("meta"):
                theirs = dict(cls.from_config(cls.load_config(config_folder(real) / component)).config)
            ours = dict(module.config)
        differ = {k for k in set(ours) | set(theirs)
                  if not k.startswith("_") and k not in TEXT_BOOKKEEPING and _norm(ours.get(k)) != _norm(theirs.get(k))}
        assert differ <= set(size_keys), f"{name} {component}: non-size fields differ: {sorted(differ - set(size_keys))}"
    if name == "tiny-xl":
        assert tiny.text_encoder_2.config.eos_token_id == 2  # SDXL's legacy id, which pools at the highest id
    # The scheduler is the real one's (read as DDPM), and so is each tokenizer's pad token and length.
    import json

    from diffusers import DDPMScheduler

    from lowmcgm.tokenizer import build_sd_tokenizer

    real_scheduler = DDPMScheduler.from_config(
        json.loads((config_folder(real) / "scheduler" / "scheduler_config.json").read_text()))
    assert dict(tiny.noise_scheduler.config) == dict(real_scheduler.config)
    for sub, tokenizer in (("tokenizer", tiny.tokenizer), ("tokenizer_2", tiny.tokenizer_2)):
        if tokenizer is None:
            continue
        real_tokenizer = build_sd_tokenizer(real, sub)
        assert tokenizer.convert_ids_to_tokens(tokenizer.pad_token_id) == real_tokenizer.convert_ids_to_tokens(
            real_tokenizer.pad_token_id)
        assert tokenizer.model_max_length == real_tokenizer.model_max_length
        # <|endoftext|> is the highest id of the vocabulary, as in CLIP's (what argmax pooling relies on).
        assert tokenizer.eos_token_id == max(tokenizer.get_vocab().values())


def _norm(value):
    """Lists and tuples compare alike (JSON has only lists)."""
    return list(value) if isinstance(value, (list, tuple)) else value
