"""Training on SDXL (the tiny SDXL-shaped model): both encoders' handles, the pooled embedding and the
photo's size numbers reach the UNet, the text cache, resume, and what is refused on SDXL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lowmcgm.artifact import load_artifact
from lowmcgm.cli import main
from lowmcgm.config import apply_overrides, resolve_config
from lowmcgm.errors import UserError
from lowmcgm.models.tiny import build_tiny_base
from lowmcgm.training.trainer import train


def _cfg(image, masks, out, **overrides):
    base = {"model.base_model": "tiny-xl", "data.image": image, "data.masks": masks, "output.out": str(out),
            "train.phase1_steps": 4, "train.phase2_steps": 4, "train.checkpoint_every": 0}
    return resolve_config("tiny-cpu", None, base | overrides)


@pytest.fixture
def wide_photo(tmp_path):
    """A 128x96 photo (wider than tall) with two subjects: the centre crop takes 16 px off each side."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    a, b = np.zeros((96, 128), np.uint8), np.zeros((96, 128), np.uint8)
    a[20:60, 30:60], b[40:80, 70:100] = 255, 255
    paths = [tmp_path / name for name in ("photo.png", "a.png", "b.png")]
    for path, array in zip(paths, (pixels, a, b)):
        Image.fromarray(array).save(path)
    return str(paths[0]), [str(paths[1]), str(paths[2])]


def test_sdxl_trains_handles_in_both_encoders_and_a_unet_lora(wide_photo, tmp_path):
    image, masks = wide_photo
    base = build_tiny_base("tiny-xl")
    init_2 = base.text_encoder_2.get_input_embeddings().weight[
        base.tokenizer_2("dog", add_special_tokens=False).input_ids[0]].clone()
    out = tmp_path / "run"
    art = load_artifact(train(_cfg(image, masks, out, **{"data.init_words": ["dog", "cat"]}), base=base))
    assert art.text_width == 64 and art.meta["base_model_version"] == "sdxl_base_v1-0"
    assert art.handle_vector_sets[0].shape == art.handle_vector_sets[1].shape == (2, 32)
    assert not torch.allclose(art.handle_vector_sets[1][0], init_2.float())  # the second encoder's rows trained
    assert art.mask_encoder["proj.weight"].shape[0] == 64  # mask tokens as wide as the joint context
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in art.unet_lora.items())
    # config.toml says which maps the attention losses read: SDXL has none at its highest level.
    assert ("# On this model, the attention losses read 16x16 maps (latent side / 2, derived from the model) of "
            "3 cross-attention layers in down_blocks.1, up_blocks.1.") in (out / "config.toml").read_text()
    history = json.loads((out / "loss_history.json").read_text())
    assert len(history) == 8 and all(np.isfinite(h["total"]) for h in history)
    # train() leaves the base as it came: no handle wrappers, no LoRA layers.
    assert type(base.text_encoder_2.get_input_embeddings()).__name__ == "Embedding"


def test_the_unet_sees_the_pooled_embedding_and_the_photos_size_and_crop(wide_photo, tmp_path):
    image, masks = wide_photo
    base = build_tiny_base("tiny-xl")
    seen = []
    base.unet.add_time_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    base.unet.add_embedding.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    train(_cfg(image, masks, tmp_path / "run", **{"train.phase2_steps": 0, "train.phase1_steps": 1}), base=base)
    time_ids, added = seen[0], seen[1]
    # (original height, width, crop top, left, target height, width): 96x128 resized to 64x85, the
    # central 64 px taken from 10 px in (diffusers' and kohya's SDXL trainers pass the same numbers).
    assert time_ids.view(-1, 6)[0].tolist() == [96, 128, 0, 10, 64, 64]
    pooled_width = base.text_encoder_2.config.projection_dim
    assert added.shape[-1] == pooled_width + 6 * base.unet.config.addition_time_embed_dim
    assert added[:, :pooled_width].abs().sum() > 0


def test_text_cache_on_sdxl_gives_the_same_artifact(photo, tmp_path, monkeypatch):
    from lowmcgm.training import phases

    image, a, b = photo
    events = []
    cfg = _cfg(image, [a, b], tmp_path / "cached", **{"train.phase2_handle_lr": 0.0})
    base = build_tiny_base("tiny-xl")
    cached = load_file(train(cfg, on_progress=events.append, base=base))
    assert any("text encoder moved off the GPU" in e.get("text", "") for e in events)
    monkeypatch.setattr(phases, "text_encoder_is_frozen", lambda cfg, phase: False)
    plain = load_file(train(apply_overrides(cfg, {"output.out": str(tmp_path / "plain")}, "t")))
    assert "handles.vectors_2" in plain
    for key in plain:  # the cache encodes all prompts in one batch: float noise of 1e-6 remains
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=1e-5)


def test_interrupt_and_resume_on_sdxl_gives_the_same_artifact(photo, tmp_path):
    image, a, b = photo
    straight = load_file(train(_cfg(image, [a, b], tmp_path / "a")))
    cfg = _cfg(image, [a, b], tmp_path / "b")

    def stop(event):
        if event["kind"] == "step" and event["phase"] == 2 and event["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_progress=stop)
    resumed = load_file(train(cfg, resume=True))
    assert straight.keys() == resumed.keys() and "handles.vectors_2" in straight
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize("overrides,fragment", [
    ({"train.use_prior_preservation": True, "train.class_prompt": "a dog"}, "use_prior_preservation is not supported"),
    ({"lora.use_text_encoder_lora": True}, "use_text_encoder_lora is not supported on SDXL"),
    ({"lora.phase2_mode": "full"}, "'full' is not supported on SDXL"),
    ({"model.resolution": 32}, "below 48 px: SDXL models were made for 64 px"),
])
def test_what_sdxl_cannot_train_is_refused_before_anything_is_written(photo, tmp_path, overrides, fragment):
    image, a, b = photo
    out = tmp_path / "run"
    with pytest.raises(UserError, match=fragment):
        train(_cfg(image, [a, b], out, **overrides))
    assert not (out / "config.toml").exists()


def test_lowmcgm_train_on_sdxl_through_the_cli(photo, tmp_path, capsys):
    image, a, b = photo
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny-cpu", "--base-model", "tiny-xl", "--image", image, "--mask", a,
                 "--mask", b, "--out", str(out), "--set", "train.phase1_steps=2", "--set",
                 "train.phase2_steps=2"]) == 0
    assert len(load_artifact(out / "lowmcgm.safetensors").handle_vector_sets) == 2
    assert main(["train", "--preset", "tiny-cpu", "--base-model", "tiny-xl", "--image", image, "--mask", a,
                 "--mask", b, "--out", str(tmp_path / "bad"), "--set", "model.resolution=40"]) == 2
    err = capsys.readouterr().err
    assert "below 48 px" in err and "Traceback" not in err


def _mlp_calls(encoder) -> list[int]:
    # Inside the layer's checkpointed forward (transformers keeps hooks on the layer itself outside it),
    # so a recompute in backward counts as a second call. A pre-hook: torch stops a recompute once it
    # has the tensors backward needs, before the MLP returns.
    calls = []
    first_mlp = next(m for m in encoder.modules() if type(m).__name__ == "CLIPMLP")
    first_mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


def test_text_encoder_checkpointing_recomputes_both_encoders_and_trains_the_same_handles(photo, tmp_path):
    image, a, b = photo
    steps = {"train.phase1_steps": 3, "train.phase2_steps": 0}
    plain, checkpointed = build_tiny_base("tiny-xl"), build_tiny_base("tiny-xl")
    counts = {}
    for name, base, on in (("plain", plain, False), ("checkpointed", checkpointed, True)):
        counts[name] = [_mlp_calls(base.text_encoder), _mlp_calls(base.text_encoder_2)]
        train(_cfg(image, [a, b], tmp_path / name, **steps, **{"model.text_encoder_checkpointing": on}), base=base)
    for plain_calls, checkpointed_calls in zip(*counts.values()):
        assert len(checkpointed_calls) == len(plain_calls) + 3  # one recompute per step
    straight = load_file(tmp_path / "plain" / "lowmcgm.safetensors")
    again = load_file(tmp_path / "checkpointed" / "lowmcgm.safetensors")
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(straight[key], again[key]), key


def test_text_encoders_stored_in_fp8_train_the_handles_of_both(photo, tmp_path):
    from lowmcgm.adapters import is_stored_in_fp8

    image, a, b = photo
    base = build_tiny_base("tiny-xl")
    init_2 = base.text_encoder_2.get_input_embeddings().weight[
        base.tokenizer_2("dog", add_special_tokens=False).input_ids[0]].clone()
    settings = {"model.fp8_text_encoders": True, "model.text_encoder_checkpointing": True,
                "model.use_gradient_checkpointing": True, "data.init_words": ["dog", "cat"]}
    art = load_artifact(train(_cfg(image, [a, b], tmp_path / "run", **settings), base=base))
    assert not is_stored_in_fp8(base.unet)  # model.fp8_base is the UNet's, and off
    for encoder in base.text_encoders:
        linears = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(m.parametrizations.weight.original.dtype == torch.float8_e4m3fn for m in linears)
    second = art.handle_vector_sets[1]
    assert torch.isfinite(second).all() and not torch.allclose(second[0], init_2.float())


@pytest.mark.parametrize("overrides,fragment", [
    ({"model.fp8_text_encoders": True}, "needs model.text_encoder_checkpointing = true"),
    ({"model.fp8_text_encoders": True, "model.text_encoder_checkpointing": True, "lora.phase2_mode": "full"},
     "model.fp8_text_encoders stores frozen weights in fp8, but lora.phase2_mode = 'full'"),
])
def test_fp8_text_encoders_are_refused_where_they_cannot_work(overrides, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve_config("tiny-cpu", None, overrides)


@pytest.mark.parametrize("preset", ["sdxl-8gb", "sdxl-6gb"])
def test_the_sdxl_card_presets_train_and_sample_on_the_tiny_sdxl_model(photo, tmp_path, preset):
    # The presets as shipped (fp8 storage, checkpointing, 8-bit AdamW where CUDA has it), at the
    # tiny model's size; on the CPU the trainer computes in fp32 with torch AdamW.
    image, a, b = photo
    out = tmp_path / preset
    assert main(["train", "--preset", preset, "--base-model", "tiny-xl", "--set", "model.resolution=64",
                 "--set", "train.phase1_steps=2", "--set", "train.phase2_steps=2", "--image", image,
                 "--mask", a, "--mask", b, "--out", str(out)]) == 0
    art = load_artifact(out / "lowmcgm.safetensors")
    assert len(art.handle_vector_sets) == 2 and art.unet_lora
    model = art.meta["training_config"]["model"]
    assert model["fp8_base"] and model["fp8_text_encoders"] == (preset == "sdxl-6gb")
    drawn = tmp_path / "drawn"
    assert main(["sample", "--artifact", str(out / "lowmcgm.safetensors"), "--base-model", "tiny-xl",
                 "--prompt", "a photo of <asset0>", "--pose", f"asset0={a}", "--num-images", "1",
                 "--steps", "2", "--out", str(drawn)]) == 0
    images = json.loads((drawn / "samples.json").read_text())["prompts"][0]["images"]
    assert len(images) == 1 and (drawn / images[0]["file"]).is_file()
