"""Pose guidance: the bias and its fade, the guided columns, and its effect on the tiny model's maps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_sampler import FAST, files, sampler  # noqa: F401 (fixtures)

from lowmcgm.artifact import load_artifact
from lowmcgm.models.tiny import build_tiny_base
from lowmcgm.sampling.pose_guidance import PoseGuide, attention_energy, guided_columns
from lowmcgm.sampling.prompts import PromptSpec, fit_pose_masks, plan_prompts
from lowmcgm.sampling.sampler import build_sampler

SETTINGS = dataclasses.replace(FAST, steps=8, guidance_scale=3.0)


def test_bias_is_plus_inside_minus_outside_on_the_conditional_rows_and_fades():
    masks = torch.zeros(1, 8, 8)
    masks[0, :4] = 1  # top half
    guide = PoseGuide(columns=[5], masks=masks, strength=2.0, steps=4, uncond_rows=1)
    bias = guide.bias(batch=2, num_queries=64, num_keys=10, like=torch.zeros(1))
    assert bias.shape == (2, 1, 64, 10)
    assert torch.all(bias[0] == 0), "the unconditional row is never guided"
    column = bias[1, 0, :, 5].reshape(8, 8)
    assert torch.all(column[:4] == 2.0) and torch.all(column[4:] == -2.0)
    assert torch.all(bias[1, 0, :, [0, 1, 2, 3, 4, 6, 7, 8, 9]] == 0)
    coarse = guide.bias(batch=2, num_queries=4, num_keys=10, like=torch.zeros(1))[1, 0, :, 5]
    assert coarse.tolist() == [2.0, 2.0, -2.0, -2.0]  # averaged down to a 2x2 layer
    weights = []
    for step in range(6):
        guide.on_step_end(None, step - 1, None, {}) if step else None
        weights.append(guide.weight())
    assert weights == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    assert guide.bias(2, 64, 10, torch.zeros(1)) is None


def test_guided_columns_pair_handles_and_mask_tokens_and_skip_blank_poses():
    poses = torch.zeros(3, 4, 4)
    poses[0, 0] = 1
    poses[2, 3] = 1  # handle 1 has the blank pose
    text_ids = [49406, 10, 500, 11, 501, 12, 502, 49407] + [49407] * 69
    columns, masks = guided_columns(text_ids, [500, 501, 502], poses, mask_token_start=77)
    assert columns == [2, 77, 6, 79]
    assert torch.equal(masks, torch.stack([poses[0], poses[0], poses[2], poses[2]]))
    columns, _ = guided_columns(text_ids, [500, 501, 502], poses, mask_token_start=None)
    assert columns == [2, 6]


def test_energy_is_zero_inside_and_grows_outside():
    masks = torch.zeros(1, 8, 8)
    masks[0, :, :4] = 1
    inside = torch.zeros(1, 8, 8)
    inside[0, :, :4] = 1
    outside = 1 - inside
    assert attention_energy(inside, masks) == 0
    assert attention_energy(outside, masks) == 1
    assert 0 < attention_energy(torch.ones(1, 8, 8), masks) < 1


def test_masks_pool_to_a_non_square_layer_in_its_layout():
    """A 64x96 image: its latent / 4 layer (of the tiny model) has 16x24 queries, a coarser one 2x3."""
    masks = torch.zeros(1, 64, 96)
    masks[0, :, :32] = 1  # the left third
    guide = PoseGuide(columns=[5], masks=masks, strength=2.0, steps=4)
    column = guide.bias(batch=1, num_queries=16 * 24, num_keys=10, like=torch.zeros(1))[0, 0, :, 5].reshape(16, 24)
    assert torch.all(column[:, :8] == 2.0) and torch.all(column[:, 8:] == -2.0)
    assert guide.masks_at(6).reshape(2, 3).tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    inside = torch.zeros(1, 16, 24)
    inside[0, :, :8] = 1
    assert attention_energy(inside, masks) == 0 and attention_energy(1 - inside, masks) == 1


def _share_inside(sampler, plan, settings, label: str) -> float:
    _, maps = sampler.generate_with_attention(plan, seed=3, settings=settings)
    attention = dict(maps)[label]
    mask = fit_pose_masks(plan, settings.height, settings.width)[0][None, None]
    small = torch.nn.functional.adaptive_avg_pool2d(mask, attention.shape)[0, 0]
    return float((attention * small).sum() / attention.sum())


def _plan(files):
    artifact = load_artifact(files["artifact"])
    return plan_prompts([PromptSpec("a photo of <asset0>")], {"<asset0>": str(files["m0"])},
                        artifact.handles, None)[0]


def test_attention_guidance_raises_the_share_of_attention_inside_the_mask(files, sampler):
    plan = _plan(files)
    off = _share_inside(sampler, plan, SETTINGS, "<asset0>")
    guided = dataclasses.replace(SETTINGS, pose_guidance="attention", pose_guidance_strength=8.0)
    on = _share_inside(sampler, plan, guided, "<asset0>")
    assert on > off + 0.02, (off, on)


def test_latent_guidance_raises_the_share_inside_the_mask_more_the_stronger_it_is(files, sampler):
    """Measured on the pipeline's own passes (no bias there): only the moved latent can do it.
    The tiny random model follows weakly (0.178 -> 0.201 -> 0.220 when written)."""
    plan = _plan(files)
    shares = [_share_inside(sampler, plan, SETTINGS, "<asset0>")]
    for strength in (30.0, 100.0):
        guided = dataclasses.replace(SETTINGS, pose_guidance="latent", pose_guidance_strength=strength)
        shares.append(_share_inside(sampler, plan, guided, "<asset0>"))
    assert shares[0] < shares[1] < shares[2] and shares[2] > shares[0] + 0.02, shares


# (mode, strength, the column whose share is measured): in latent mode it is the mask token's that
# follows on the tiny random model (0.22 -> 0.42 at 64x96, 0.21 -> 0.85 with attention, when written).
NON_SQUARE = {"attention": ("attention", 8.0, "<asset0>"), "latent": ("latent", 100.0, "mask <asset0>")}


@pytest.mark.parametrize("case", NON_SQUARE.values(), ids=NON_SQUARE.keys())
def test_guidance_on_a_non_square_image_pulls_attention_into_the_pose(files, sampler, case):
    mode, strength, label = case
    wide = dataclasses.replace(SETTINGS, height=64, width=96)
    plan = _plan(files)
    guided = dataclasses.replace(wide, pose_guidance=mode, pose_guidance_strength=strength)
    image, maps = sampler.generate_with_attention(plan, seed=3, settings=guided)
    assert image.size == (96, 64) and all(m.shape == (16, 24) for _, m in maps)
    off, on = _share_inside(sampler, plan, wide, label), _share_inside(sampler, plan, guided, label)
    assert on > off + 0.1, (off, on)


def test_a_blank_pose_is_not_guided(files, sampler):
    artifact = load_artifact(files["artifact"])
    plan = plan_prompts([PromptSpec("a photo of <asset0>")], {}, artifact.handles, None)[0]
    guided = dataclasses.replace(SETTINGS, pose_guidance="attention", pose_guidance_strength=8.0)
    assert sampler.pose_guide(plan, guided, 1) is None
    plain = np.asarray(sampler.generate(plan, [5], SETTINGS)[0])
    np.testing.assert_array_equal(np.asarray(sampler.generate(plan, [5], guided)[0]), plain)


def test_guidance_without_mask_tokens_uses_the_poses(files):
    """Break-a-scene mode (an artifact without mask tokens): poses are allowed once guidance is on."""
    artifact = load_artifact(files["plain"])
    poses = {"<asset0>": str(files["m0"])}
    with pytest.raises(Exception, match="--guidance"):
        plan_prompts([PromptSpec("a photo of <asset0>")], poses, artifact.handles, "no mask tokens")
    plan = plan_prompts([PromptSpec("a photo of <asset0>")], poses, artifact.handles, "no mask tokens",
                        guided=True)[0]
    assert plan.poses == {"<asset0>": str(files["m0"])} and not plan.use_mask_tokens
    plain_sampler = build_sampler(build_tiny_base("tiny"), artifact, SETTINGS)
    guided = dataclasses.replace(SETTINGS, pose_guidance="attention", pose_guidance_strength=8.0)
    guide = plain_sampler.pose_guide(plan, guided, 1)
    assert guide is not None and all(c < 77 for c in guide.columns)  # the handle's own column only
    unguided = np.asarray(plain_sampler.generate(plan, [5], SETTINGS)[0]).astype(int)
    assert np.abs(np.asarray(plain_sampler.generate(plan, [5], guided)[0]).astype(int) - unguided).max() > 0


def test_latent_guidance_batches_with_classifier_free_guidance(files, sampler):
    """Several seeds in one call (the pipeline then runs a batch of 2 x seeds): each image as alone."""
    guided = dataclasses.replace(SETTINGS, pose_guidance="latent", pose_guidance_strength=30.0)
    plan = _plan(files)
    together = [np.asarray(im).astype(int) for im in sampler.generate(plan, [3, 4], guided)]
    alone = np.asarray(sampler.generate(plan, [4], guided)[0]).astype(int)
    assert np.abs(together[1] - alone).max() <= 2


def test_every_guided_mode_has_a_default_strength():
    from lowmcgm.config import config_field
    from lowmcgm.sampling.pose_guidance import DEFAULT_STRENGTH

    modes = config_field("sample.pose_guidance")[0].metadata["choices"]
    assert set(DEFAULT_STRENGTH) == set(modes) - {"none"}


def test_latent_guidance_steps_alike_with_and_without_checkpointing():
    # Checkpointing (the default) recomputes the blocks in the backward, captures included: the
    # step must be the one the stored activations give, and the UNet is left as it was found.
    from lowmcgm.attention_capture import CrossAttentionStore, install_capture, loss_layer_names
    from lowmcgm.sampling.pose_guidance import LatentGuidance

    unet = build_tiny_base("tiny").unet.requires_grad_(False).eval()
    store = CrossAttentionStore()
    install_capture(unet, loss_layer_names(unet, 0, 32), store)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=gen)
    context = torch.randn(1, 78, unet.config.cross_attention_dim, generator=gen)
    masks = torch.zeros(2, 64, 64)
    masks[:, 8:40, 16:48] = 1
    steps = [LatentGuidance(unet, store, context, PoseGuide([5, 77], masks, 10.0, steps=4), checkpointing=on)
             .step(latents, torch.tensor([500]), lambda x, _: x) for on in (False, True)]
    assert not torch.equal(steps[0], latents)  # it guided
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-5, atol=1e-6)
    assert not unet.is_gradient_checkpointing and store.key_index is None
