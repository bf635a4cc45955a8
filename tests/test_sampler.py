"""Pose-mask sampling on the tiny model: context layout, seeds, PNG metadata, pictures.

The artifact here is built by hand (random handles, encoder and a non-zero LoRA), so these tests
need no training run; ``test_cli_sample.py`` and ``test_cli_run.py`` use trained ones.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_box_masks
from PIL import Image

from lowmcgm.adapters import add_lora, lora_state_dict
from lowmcgm.artifact import Artifact, load_artifact, save_artifact
from lowmcgm.attention_capture import CapturingCrossAttnProcessor
from lowmcgm.errors import UserError
from lowmcgm.mask_encoder import MaskEncoder
from lowmcgm.models.tiny import build_tiny_base
from lowmcgm.sampling.previews import render_loss_curve, save_loss_curve
from lowmcgm.sampling.prompts import PromptSpec, parse_poses, plan_prompts
from lowmcgm.config import SampleSettings
from lowmcgm.sampling.records import read_png_parameters, write_samples
from lowmcgm.sampling.sampler import build_sampler, check_base_matches

SIZE = 64  # the tiny model's resolution: pose files at this size reach the encoder unresized
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
BOXES = [(4, 4, 24, 40), (30, 10, 60, 30), (10, 44, 54, 62)]  # one rectangle per handle
# Unguided: these tests look at the mask tokens and the pipeline's own UNet calls (pose guidance,
# which adds calls of its own, has tests/test_pose_guidance.py).
FAST = SampleSettings(num_images=1, steps=2, height=SIZE, width=SIZE, dtype="fp32", pose_guidance="none")


def make_artifact(path: Path, num_handles: int = 3, mask_tokens: bool = True) -> Path:
    base = build_tiny_base("tiny")
    torch.manual_seed(1)
    add_lora(base.unet, LORA_TARGETS, rank=2, alpha=2.0)
    with torch.no_grad():
        for name, param in base.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)  # non-zero, so a LoRA that fails to load shows
    width = base.text_width
    encoder = MaskEncoder(width)
    with torch.no_grad():
        encoder.proj.weight.normal_(0.0, 0.05)  # rows of different masks then differ clearly
    artifact = Artifact(
        handles=[f"<asset{i}>" for i in range(num_handles)], handle_vector_sets=[torch.randn(num_handles, width)],
        mask_encoder=encoder.state_dict() if mask_tokens else {}, unet_lora=lora_state_dict(base.unet),
        text_encoder_lora={},
        meta={"base_model": "tiny", "base_model_hash": base.config_hash, "text_width": width,
              "prediction_type": base.prediction_type, "resolution": SIZE, "mask_size": 64 if mask_tokens else 0,
              "lora": {"mode": "lora", "rank": 2, "alpha": 2.0, "unet_targets": list(LORA_TARGETS),
                       "text_encoder_targets": []}},
    )
    save_artifact(artifact, path, dtype="fp32")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sampler")
    out = {"artifact": make_artifact(folder / "a.safetensors"),
           "plain": make_artifact(folder / "plain.safetensors", num_handles=2, mask_tokens=False)}
    return out | write_box_masks(folder, BOXES, SIZE)


@pytest.fixture(scope="module")
def sampler(files):
    return build_sampler(build_tiny_base("tiny"), load_artifact(files["artifact"]), FAST)


def expected_token(artifact: Artifact, mask_file: Path | None) -> torch.Tensor:
    """The mask token worked out by hand: W @ flatten(mask at 64x64) + b."""
    flat = torch.zeros(64 * 64)
    if mask_file is not None:
        flat = torch.from_numpy(np.asarray(Image.open(mask_file).convert("L")) > 127).float().flatten()
    return artifact.mask_encoder["proj.weight"] @ flat + artifact.mask_encoder["proj.bias"]


@contextmanager
def unet_contexts(unet: torch.nn.Module):
    seen: list[torch.Tensor] = []
    hook = unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


# prompt, poses (handle -> mask index), expected mask of each token in order (None: blank), use masks
CONTEXT_CASES = {
    "1 handle": ("a photo of <asset0>", {"asset0": 0}, [0], True),
    "2 handles, prompt order": ("a photo of <asset1> and <asset0>", {"asset0": 0, "asset1": 1}, [1, 0], True),
    "3 handles": ("a photo of <asset2> and <asset0> and <asset1>", {"asset0": 0, "asset1": 1, "asset2": 2},
                  [2, 0, 1], True),
    "all=": ("a photo of <asset0> and <asset1>", {"all": 2}, [2, 2], True),
    "all= and one own pose": ("a photo of <asset0> and <asset1>", {"all": 2, "asset1": 0}, [2, 0], True),
    "blank": ("a photo of <asset0> and <asset1>", {"asset1": 1}, [None, 1], True),
    "no-mask": ("a photo of <asset0> and <asset1>", {}, [], False),
}


@pytest.mark.parametrize("case", CONTEXT_CASES.values(), ids=CONTEXT_CASES.keys())
def test_mask_tokens_reach_the_unet_in_prompt_order_and_zeros_go_to_the_unconditional_branch(files, sampler, case):
    prompt, poses, expected, use_masks = case
    artifact = load_artifact(files["artifact"])
    settings = SampleSettings(**{**FAST.__dict__, "use_mask_tokens": use_masks})
    reason = None if use_masks else "--no-mask drops the mask tokens"
    plan = plan_prompts([PromptSpec(prompt)], parse_poses([f"{h}={files[f'm{i}']}" for h, i in poses.items()]),
                        artifact.handles, reason)[0]
    with unet_contexts(sampler.pipe.unet) as seen:
        sampler.generate(plan, [0], settings)
    assert len(seen) == settings.steps
    k = len(expected)
    want = [expected_token(artifact, files[f"m{i}"] if i is not None else None) for i in expected]
    for context in seen:
        assert context.shape == (2, 77 + k, artifact.text_width)  # (uncond, cond) x (77 + k) x d
        uncond, cond = context
        assert torch.count_nonzero(uncond[77:]) == 0
        for row, token in enumerate(want):
            torch.testing.assert_close(cond[77 + row], token, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(cond[:77]) > 0


def test_artifact_without_mask_encoder_samples_without_tokens_and_refuses_poses(files):
    artifact = load_artifact(files["plain"])
    plain = build_sampler(build_tiny_base("tiny"), artifact, FAST)
    plan = plan_prompts([PromptSpec("a photo of <asset0>")], {}, artifact.handles,
                        "this artifact was trained without mask tokens")[0]
    with unet_contexts(plain.pipe.unet) as seen:
        plain.generate(plan, [0], FAST)
    assert {tuple(c.shape) for c in seen} == {(2, 77, artifact.text_width)}
    with pytest.raises(UserError, match="without mask tokens"):
        plan_prompts([PromptSpec("a photo of <asset0>")], {"<asset0>": str(files["m0"])}, artifact.handles,
                     "this artifact was trained without mask tokens")


def test_artifact_weights_are_in_the_model(files, sampler):
    artifact = load_artifact(files["artifact"])
    state = lora_state_dict(sampler.pipe.unet)
    assert state.keys() == artifact.unet_lora.keys()
    for key, value in artifact.unet_lora.items():
        torch.testing.assert_close(state[key], value)
    ids = sampler.pipe.tokenizer.convert_tokens_to_ids(artifact.handles)
    torch.testing.assert_close(sampler.pipe.text_encoder.get_input_embeddings().weight[ids], artifact.handle_vectors)


def test_same_seed_same_image_and_batching_does_not_change_an_image(files, sampler):
    artifact = load_artifact(files["artifact"])
    plan = plan_prompts([PromptSpec("a photo of <asset0>")], {"<asset0>": str(files["m0"])}, artifact.handles, None)[0]
    first, again = (np.asarray(sampler.generate(plan, [3], FAST)[0]) for _ in range(2))
    np.testing.assert_array_equal(first, again)
    other = np.asarray(sampler.generate(plan, [4], FAST)[0])
    assert np.abs(first.astype(int) - other.astype(int)).max() > 10
    batched = [np.asarray(im) for im in sampler.generate(plan, [3, 4], FAST)]
    assert np.abs(batched[0].astype(int) - first.astype(int)).max() <= 2
    assert np.abs(batched[1].astype(int) - other.astype(int)).max() <= 2


def test_png_parameters_round_trip_and_index(files, sampler, tmp_path):
    artifact = load_artifact(files["artifact"])
    plans = plan_prompts([PromptSpec("a photo of <asset1> and <asset0> at the beach")],
                         {"<asset1>": str(files["m1"])}, artifact.handles, None)
    settings = SampleSettings(**{**FAST.__dict__, "num_images": 2, "seed": 11, "negative_prompt": "snow"})
    info = {"artifact": "a.safetensors", "artifact_sha256": "ab" * 32, "base_model": "tiny"}
    grid = write_samples(sampler, plans, settings, tmp_path, info)
    index = json.loads((tmp_path / "samples.json").read_text())
    images = index["prompts"][0]["images"]
    assert [im["seed"] for im in images] == [11, 12]
    meta = read_png_parameters(tmp_path / images[1]["file"])
    assert meta["prompt"] == "a photo of <asset1> and <asset0> at the beach"
    assert (meta["seed"], meta["steps"], meta["guidance_scale"]) == (12, 2, 7.5)
    assert (meta["negative_prompt"], meta["scheduler"], meta["artifact_sha256"]) == ("snow", "dpmpp_2m", "ab" * 32)
    assert meta["poses"] == {"<asset1>": str(files["m1"]), "<asset0>": "blank"}
    assert index["prompts"][0]["poses"] == meta["poses"]
    # The contact sheet holds two mask cells and two images, each at least 128 px wide.
    assert Image.open(grid).width >= 4 * 128


def test_attention_picture_maps_cover_each_handle_and_mask_token(files, sampler):
    artifact = load_artifact(files["artifact"])
    plan = plan_prompts([PromptSpec("a photo of <asset0> and <asset1>")], {"all": str(files["m2"])},
                        artifact.handles, None)[0]
    image, maps = sampler.generate_with_attention(plan, 0, FAST)
    assert [label for label, _ in maps] == ["<asset0>", "<asset1>", "mask <asset0>", "mask <asset1>"]
    assert all(m.shape == (16, 16) and torch.isfinite(m).all() and m.sum() > 0 for _, m in maps)  # latent 32 / auto 2
    assert image.size == (SIZE, SIZE)
    # Capture was only borrowed: plain SDPA everywhere afterwards.
    assert not any(isinstance(p, CapturingCrossAttnProcessor) for p in sampler.pipe.unet.attn_processors.values())


def test_base_of_another_architecture_is_refused(files):
    artifact = load_artifact(files["artifact"])
    with pytest.raises(UserError, match="made for base model 'tiny'"):
        check_base_matches(artifact, build_tiny_base("tiny-v"), files["artifact"])


def test_loss_curve_draws_every_nonzero_term(tmp_path):
    history = [{"phase": 1 + (i >= 5), "step": i % 5 + 1, "total": 1.0 / (i + 1), "rec": 0.5, "attn": 0.1 * i,
                "mask_attn": 0.2, "prior": 0.0} for i in range(10)]
    image = render_loss_curve(history)
    assert image.width == 800 and image.height > 4 * 140  # four panels: prior is all zero
    (tmp_path / "h.json").write_text(json.dumps(history))
    assert Image.open(save_loss_curve(tmp_path / "h.json", tmp_path / "c.png")).size == image.size
    with pytest.raises(UserError, match="No loss history"):
        save_loss_curve(tmp_path / "missing.json", tmp_path / "c.png")


def test_every_scheduler_choice_has_its_factory():
    from lowmcgm.config import config_field
    from lowmcgm.sampling.pipeline import SCHEDULERS

    assert tuple(SCHEDULERS) == config_field("sample.scheduler")[0].metadata["choices"]


def test_library_settings_are_checked_with_flag_names():
    from lowmcgm.sampling.checks import check_settings

    with pytest.raises(UserError, match=r"Invalid sampling settings: --steps must be between 1 and 1000 \(got 0\); "
                                        r"--scheduler must be one of"):
        check_settings(SampleSettings(steps=0, scheduler="fast"))
