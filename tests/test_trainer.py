"""The training loop on the tiny model: what changes in each phase, resume, variants of the recipe."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lowmcgm.artifact import load_artifact, read_header
from lowmcgm.config import Config, apply_overrides, resolve_config
from lowmcgm.errors import UserError
from lowmcgm.models.tiny import build_tiny_base
from lowmcgm.training.checkpointing import text_encoder_checkpointed
from lowmcgm.training.checkpoints import CHECKPOINT_NAME
from lowmcgm.training.trainer import train


def _cfg(photo, out, **overrides):
    image, a, b = photo
    base = {"data.image": image, "data.masks": [a, b], "output.out": str(out),
            "train.phase1_steps": 6, "train.phase2_steps": 6, "train.checkpoint_every": 0}
    return resolve_config("tiny-cpu", None, base | overrides)


def test_phase1_changes_only_handle_rows_and_mask_encoder(photo, tmp_path):
    reference = build_tiny_base("tiny")
    base = build_tiny_base("tiny")
    vocab = len(base.tokenizer)
    cfg = _cfg(photo, tmp_path / "run", **{"train.phase2_steps": 0})
    path = train(cfg, base=base)
    art = load_artifact(path)
    trained_te = dict(base.text_encoder.named_parameters())  # train() took its handle wrapper off again
    for name, param in reference.text_encoder.named_parameters():
        got = trained_te[name]
        if "token_embedding" in name:
            got = got[:vocab]  # rows past the old vocabulary are the new handle rows
        assert torch.equal(got, param), name
    for module in ("unet", "vae"):
        ref_params = dict(getattr(reference, module).named_parameters())
        for name, param in getattr(base, module).named_parameters():
            assert torch.equal(param, ref_params[name]), f"{module}.{name} changed in phase 1"
    # The handles and the mask encoder did train.
    init = base.text_encoder.get_input_embeddings().weight[vocab:]
    assert not torch.allclose(art.handle_vectors, init.float())
    assert art.mask_encoder and not art.unet_lora
    torch.manual_seed(cfg.train.seed)
    fresh = torch.nn.Linear(64 * 64, 32)
    assert not torch.allclose(art.mask_encoder["proj.weight"], fresh.weight)


def test_phase2_trains_lora_and_writes_artifact_and_config(photo, tmp_path):
    out = tmp_path / "run"
    path = train(_cfg(photo, out, **{"lora.use_text_encoder_lora": True}))
    art = load_artifact(path)
    ups = [v for k, v in art.unet_lora.items() if "lora_B" in k]
    assert ups and any(v.abs().sum() > 0 for v in ups)  # zero-initialised, so non-zero means trained
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in art.text_encoder_lora.items())
    assert art.meta["prediction_type"] == "epsilon" and art.meta["resolution"] == "64"
    assert "phase1_steps = 6" in (out / "config.toml").read_text()
    history = json.loads((out / "loss_history.json").read_text())
    assert [h["phase"] for h in history] == [1] * 6 + [2] * 6


def test_v_prediction_model_trains(photo, tmp_path):
    path = train(_cfg(photo, tmp_path / "run", **{"model.base_model": "tiny-v"}))
    art = load_artifact(path)
    assert art.meta["prediction_type"] == "v_prediction"
    assert art.text_width == 48


@pytest.mark.parametrize("overrides", [
    {"train.batch_size": 2},
    {"data.background": "solid"},
    {"loss.use_mask_tokens": False},
    {"model.use_gradient_checkpointing": True},
    {"data.use_affine_augmentation": True, "data.background": "solid", "train.batch_size": 2},
    {"data.mask_dropout": 1.0, "data.use_mask_perturbation": True, "loss.use_mask_tokens": False},
    {"model.fp8_base": True, "model.use_gradient_checkpointing": True},
], ids=["batch2", "solid-background", "break-a-scene", "checkpointing", "affine-in-pixels",
        "dropout-without-encoder", "fp8-base"])
def test_recipe_variants_run(photo, tmp_path, overrides):
    base = build_tiny_base("tiny")
    cfg = _cfg(photo, tmp_path / "run", **{"train.phase1_steps": 3, "train.phase2_steps": 2,
                                           "model.text_encoder_checkpointing": True} | overrides)
    art = load_artifact(train(cfg, base=base))
    assert art.uses_mask_tokens == overrides.get("loss.use_mask_tokens", True)
    # The base computes as loaded again: sampling next on it (lowmcgm run, the page) checkpoints nothing.
    assert not base.unet.is_gradient_checkpointing and not text_encoder_checkpointed(base.text_encoder)
    assert not any("forward" in vars(m) for m in base.unet.modules())
    assert not base.unet.training and not base.text_encoder.training


def test_prior_preservation_uses_a_class_image_folder(photo, tmp_path):
    from PIL import Image
    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 80), (i * 60, 100, 200)).save(folder / f"c{i}.png")
    events = []
    train(_cfg(photo, tmp_path / "run", **{"train.use_prior_preservation": True, "train.num_class_images": 3,
                                           "train.class_images_dir": str(folder), "train.phase1_steps": 3,
                                           "train.phase2_steps": 0}), on_progress=events.append)
    priors = [e["losses"]["prior"] for e in events if e["kind"] == "step"]
    assert priors and all(p > 0 for p in priors)


def _stop_at(phase, step):
    def hook(event):
        if event["kind"] == "step" and event["phase"] == phase and event["step"] == step:
            raise KeyboardInterrupt
    return hook


# The third: phase 2 with frozen handles encodes its prompts once, from the trained handles; a
# resume cached them before the checkpoint's handles were loaded (found in the redesign, issue 25).
@pytest.mark.parametrize("phase,step,overrides", [(1, 4, {}), (2, 3, {}), (2, 3, {"train.phase2_handle_lr": 0.0})],
                         ids=["phase1", "phase2", "phase2-text-cached"])
def test_interrupt_and_resume_gives_the_same_artifact(photo, tmp_path, phase, step, overrides):
    straight = load_file(train(_cfg(photo, tmp_path / "a", **overrides)))
    cfg = _cfg(photo, tmp_path / "b", **overrides)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_progress=_stop_at(phase, step))
    assert (tmp_path / "b" / CHECKPOINT_NAME).is_file()
    assert not (tmp_path / "b" / "lowmcgm.safetensors").exists()
    resumed = load_file(train(cfg, resume=True))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_resume_refuses_other_settings(photo, tmp_path):
    cfg = _cfg(photo, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_progress=_stop_at(1, 2))
    other = apply_overrides(cfg, {"lora.rank": 8}, "test")  # learning rates and precision may change
    with pytest.raises(UserError, match="other settings"):
        train(other, resume=True)


def test_8bit_adamw_failing_its_test_step_trains_with_torch_adamw(photo, tmp_path, monkeypatch):
    import lowmcgm.training.trainer as trainer_mod
    from lowmcgm.training import optimizer

    monkeypatch.setattr(trainer_mod, "training_device", lambda: torch.device("cuda"))  # the probe is replaced
    monkeypatch.setattr(optimizer, "probe_adamw8bit", lambda device: "RuntimeError: CUDA Setup failed")
    events = []
    cfg = _cfg(photo, tmp_path / "run", **{"train.optimizer": "adamw8bit", "train.phase1_steps": 2,
                                           "train.phase2_steps": 2, "train.checkpoint_every": 1})
    train(cfg, on_progress=events.append)
    said = [e["text"] for e in events if e["kind"] == "message" and "8-bit AdamW" in e["text"]]
    assert said == ["bitsandbytes' 8-bit AdamW failed its test step (RuntimeError: CUDA Setup failed): using torch "
                    "AdamW, whose fp32 moments take up to 4x the optimizer memory."]
    _, meta = read_header(tmp_path / "run" / CHECKPOINT_NAME)
    assert json.loads(meta["info"])["optimizer"] == "adamw"  # what wrote it, not what train.optimizer asked for


@pytest.mark.parametrize("main_process", [True, False], ids=["main-process", "other-process"])
def test_the_fallback_line_is_said_by_the_main_process_only(monkeypatch, main_process):
    """Under ``accelerate launch`` (here: CUDA and a PartialState stood in), one process says it."""
    import accelerate

    import lowmcgm.training.trainer as trainer_mod

    class State:
        is_main_process = main_process

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(accelerate, "PartialState", State)
    events = []
    trainer_mod._say_on_main_process(events.append)("bitsandbytes' 8-bit AdamW needs a CUDA device")
    assert [e["text"] for e in events] == (["bitsandbytes' 8-bit AdamW needs a CUDA device"] if main_process else [])


def test_resume_refuses_the_state_of_the_other_optimizer(photo, tmp_path, monkeypatch):
    import lowmcgm.training.trainer as trainer_mod

    # Torch AdamW writes the checkpoint.
    cfg = _cfg(photo, tmp_path / "b", **{"train.optimizer": "adamw"})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_progress=_stop_at(1, 2))
    # Resumed with 8-bit where bitsandbytes runs: 8-bit would be built, and cannot take torch AdamW's state.
    monkeypatch.setattr(trainer_mod, "choose_optimizer", lambda t, device, say: t.optimizer)
    eight_bit = apply_overrides(cfg, {"train.optimizer": "adamw8bit"}, "test")
    with pytest.raises(UserError, match=r"was written by torch AdamW, but this run would train with bitsandbytes' "
                                        r"8-bit AdamW .*resume with --set train.optimizer=adamw"):
        train(eight_bit, resume=True)
    # The advice works: the optimizer setting may change on --resume, the optimizer may not.
    train(apply_overrides(eight_bit, {"train.optimizer": "adamw"}, "test"), resume=True)


def test_resume_without_checkpoint_is_a_user_error(photo, tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        train(_cfg(photo, tmp_path / "c"), resume=True)


def test_too_many_masks_for_the_preset(photo, tmp_path):
    with pytest.raises(UserError, match="at most 1"):
        train(_cfg(photo, tmp_path / "d", **{"data.max_concepts": 1}))


def test_default_config_is_valid():
    assert Config().train.phase1_steps == 400


def test_text_encoder_leaves_when_phase2_trains_nothing_in_it(photo, tmp_path, monkeypatch):
    from lowmcgm.training import phases

    events = []
    cfg = _cfg(photo, tmp_path / "cached", **{"train.phase2_handle_lr": 0.0})
    cached = load_file(train(cfg, on_progress=events.append))
    assert any("text encoder moved off the GPU" in e.get("text", "") for e in events)
    monkeypatch.setattr(phases, "text_encoder_is_frozen", lambda cfg, phase: False)
    plain = load_file(train(apply_overrides(cfg, {"output.out": str(tmp_path / "plain")}, "t")))
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=1e-6)
    # Handles stop at their phase-1 values: compare with a phase-1-only run.
    phase1 = load_file(train(apply_overrides(cfg, {"output.out": str(tmp_path / "p1"),
                                                   "train.phase2_steps": 0}, "t")))
    assert torch.equal(cached["handles.vectors"], phase1["handles.vectors"])


def test_preview_hook_sees_live_state_before_and_during_training(photo, tmp_path):
    seen = []
    train(_cfg(photo, tmp_path / "run", **{"output.preview_every": 3}),
          on_preview=lambda setup, state: seen.append((state.phase, state.step, setup.mcgm.handles.vectors.sum().item())))
    assert [(p, s) for p, s, _ in seen] == [(1, 0), (1, 3), (1, 6), (2, 3), (2, 6)]
    assert seen[0][2] != seen[2][2]  # the handles moved between previews


def test_handles_keep_training_in_phase2_with_a_text_encoder_lora(photo, tmp_path):
    # peft's injection freezes every parameter of the text encoder it does not own, the handle
    # vectors included; phase 2 must switch them back on.
    over = {"lora.use_text_encoder_lora": True, "train.phase2_handle_lr": 1e-2}
    both = load_file(train(_cfg(photo, tmp_path / "both", **over)))
    phase1 = load_file(train(_cfg(photo, tmp_path / "p1", **over | {"train.phase2_steps": 0})))
    assert not torch.equal(both["handles.vectors"], phase1["handles.vectors"])


def test_without_attention_loss_nothing_is_captured(photo, tmp_path):
    events = []
    train(_cfg(photo, tmp_path / "run", **{"loss.use_attention_loss": False, "train.phase2_steps": 2}),
          on_progress=events.append)
    steps = [e["losses"] for e in events if e["kind"] == "step"]
    assert steps and all(s["attn"] == 0 and s["mask_attn"] == 0 for s in steps)


def test_prior_preservation_generates_class_images_once(photo, tmp_path):
    over = {"train.use_prior_preservation": True, "train.num_class_images": 2, "train.phase1_steps": 2,
            "train.phase2_steps": 0}
    events = []
    train(_cfg(photo, tmp_path / "run", **over), on_progress=events.append)
    folder = tmp_path / "run" / "class_images"
    assert sorted(p.name for p in folder.iterdir()) == ["class_00000.png", "class_00001.png"]
    assert sum("Generating 2 class images" in e.get("text", "") for e in events) == 1
    events.clear()
    # A second run in the folder replaces the first (--overwrite) and keeps its class images: not generated again.
    train(_cfg(photo, tmp_path / "run", **over), on_progress=events.append, overwrite=True)
    assert not any("Generating" in e.get("text", "") for e in events)


MASK_AWARE = {"data.use_affine_augmentation": True, "data.mask_dropout": 0.3, "data.use_mask_perturbation": True,
              "loss.mask_encoder_input": "area_normalized", "loss.mask_token_norm": "layernorm"}


def test_interrupt_and_resume_with_mask_aware_training_gives_the_same_artifact(photo, tmp_path):
    straight = load_file(train(_cfg(photo, tmp_path / "a", **MASK_AWARE)))
    cfg = _cfg(photo, tmp_path / "b", **MASK_AWARE)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_progress=_stop_at(1, 3))
    resumed = load_file(train(cfg, resume=True))
    assert straight.keys() == resumed.keys() and "mask_encoder.norm.weight" in straight
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    histories = [json.loads((tmp_path / run / "loss_history.json").read_text()) for run in ("a", "b")]
    assert histories[0] == histories[1]


def test_token_norms_are_recorded_and_layernorm_starts_on_the_handles_scale(photo, tmp_path):
    """The paper's encoder starts at its init's scale; the LayerNorm one at the handles' text states'."""
    first = {}
    for name, overrides in (("paper", {}), ("layernorm", {"loss.mask_token_norm": "layernorm",
                                                          "loss.mask_encoder_input": "area_normalized"})):
        out = tmp_path / name
        train(_cfg(photo, out, **{"train.phase1_steps": 2, "train.phase2_steps": 0} | overrides))
        history = json.loads((out / "loss_history.json").read_text())
        assert all(h["handle_rms"] > 0 and h["mask_token_rms"] > 0 for h in history)
        first[name] = history[0]["mask_token_rms"] / history[0]["handle_rms"]
    assert 0.7 < first["layernorm"] < 1.3
    assert not 0.7 < first["paper"] < 1.3
    train(_cfg(photo, tmp_path / "bas", **{"train.phase1_steps": 1, "train.phase2_steps": 0,
                                             "loss.use_mask_tokens": False}))
    entry = json.loads((tmp_path / "bas" / "loss_history.json").read_text())[0]
    assert "handle_rms" in entry and "mask_token_rms" not in entry


def test_mask_aware_options_off_by_default_and_validated():
    cfg = Config()
    assert (cfg.data.use_affine_augmentation, cfg.data.mask_dropout, cfg.data.use_mask_perturbation,
            cfg.loss.mask_encoder_input, cfg.loss.mask_token_norm) == (False, 0.0, False, "binary", "none")
    with pytest.raises(UserError) as info:
        resolve_config(None, None, {"data.mask_dropout": 1.5, "data.affine_scale_min": 1.1,
                                    "loss.mask_token_norm": "batchnorm", "data.affine_rotate_deg": -1})
    for key in ("data.mask_dropout", "data.affine_scale_min", "loss.mask_token_norm", "data.affine_rotate_deg"):
        assert key in str(info.value)
