"""Pose guidance: the bias and its fade, the guided columns, and its effect on the tiny model's maps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_sampler import FAST, files, sampler  # noqa: F401 (fixtures)

from diffusers import DDIMScheduler

from lowmcgm.artifact import load_artifact
from lowmcgm.config import SampleSettings
from lowmcgm.models.tiny import build_tiny_base
from lowmcgm.sampling.latent_guidance import attention_energy
from lowmcgm.sampling.pose_guidance import PoseGuide, guided_columns
from lowmcgm.sampling.prompts import PromptSpec, fit_pose_masks, plan_prompts
from lowmcgm.sampling.sampler import build_sampler

SETTINGS = dataclasses.replace(FAST, steps=8, guidance_scale=3.0)


def _query_key(batch: int, num_queries: int, num_keys: int, heads: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, heads, num_queries, 4, generator=gen),
            torch.randn(batch, heads, num_keys, 4, generator=gen))


def test_fixed_bias_is_plus_inside_minus_outside_on_the_conditional_rows_and_fades():
    masks = torch.zeros(1, 8, 8)
    masks[0, :4] = 1  # top half
    guide = PoseGuide(columns=[5], masks=masks, strength=2.0, steps=4, uncond_rows=1, bias_rule="fixed")
    bias = guide.bias(*_query_key(2, 64, 10), scale=0.5)
    assert bias.shape == (2, 1, 64, 10)
    assert torch.all(bias[0] == 0), "the unconditional row is never guided"
    column = bias[1, 0, :, 5].reshape(8, 8)
    assert torch.all(column[:4] == 2.0) and torch.all(column[4:] == -2.0)
    assert torch.all(bias[1, 0, :, [0, 1, 2, 3, 4, 6, 7, 8, 9]] == 0)
    coarse = guide.bias(*_query_key(2, 4, 10), scale=0.5)[1, 0, :, 5]
    assert coarse.tolist() == [2.0, 2.0, -2.0, -2.0]  # averaged down to a 2x2 layer
    weights = []
    for step in range(6):
        guide.on_step_end(None, step - 1, None, {}) if step else None
        weights.append(guide.weight())
    assert weights == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    assert guide.bias(*_query_key(2, 64, 10), scale=0.5) is None


def test_dense_bias_moves_logits_toward_the_extremes_by_area_and_noise_level():
    """DenseDiffusion's rule: inside the mask a posed column's logit moves toward the query's
    largest, every other logit toward its smallest, by strength x (1 - area) x (t/T)^5."""
    masks = torch.zeros(1, 8, 8)
    masks[0, :2] = 1  # a quarter of the image
    guide = PoseGuide(columns=[5], masks=masks, strength=1.0, steps=4, uncond_rows=1, bias_rule="dense",
                      fade=False)
    query, key = _query_key(2, 64, 10)
    logits = (query @ key.transpose(-1, -2)) * 0.5
    bias = guide.bias(query, key, scale=0.5)
    assert bias.shape == (2, 2, 64, 10) and torch.all(bias[0] == 0)
    moved = logits[1] + bias[1]
    inside, outside = 3, 40  # queries in row 0 and row 5 of the 8x8 map
    rate_inside = 1.0 - 0.25  # the query lies in a mask of a quarter of the image
    highest, lowest = logits[1, :, inside].amax(-1), logits[1, :, inside].amin(-1)
    torch.testing.assert_close(moved[:, inside, 5], logits[1, :, inside, 5] + rate_inside * (highest - logits[1, :, inside, 5]))
    torch.testing.assert_close(moved[:, inside, 0], logits[1, :, inside, 0] - rate_inside * (logits[1, :, inside, 0] - lowest))
    # A background query (area 0): every logit, the posed column's too, goes all the way down.
    torch.testing.assert_close(moved[:, outside], logits[1, :, outside].amin(-1, keepdim=True).expand(-1, 10))
    # Half the noise: (1/2)^5 of the change; the share of attention on the column inside rises.
    guide.noise_level = 0.5
    torch.testing.assert_close(guide.bias(query, key, scale=0.5), bias / 32)
    assert bool((moved[:, inside].softmax(-1)[:, 5] > logits[1, :, inside].softmax(-1)[:, 5]).all())


def test_dense_self_attention_bias_pulls_keys_of_the_same_subject_and_pushes_the_rest():
    masks = torch.zeros(2, 8, 8)
    masks[:, :, :2] = 1  # one subject (two columns) on the left quarter
    guide = PoseGuide(columns=[5, 77], masks=masks, strength=1.0, steps=4, uncond_rows=1, subjects=[0, 0],
                      bias_rule="dense", fade=False, self_strength=0.3)
    query, key = _query_key(2, 64, 64)
    logits = (query @ key.transpose(-1, -2)) * 0.5
    bias = guide.self_bias(query, key, scale=0.5)
    assert bias.shape == (2, 2, 64, 64) and torch.all(bias[0] == 0)
    q, same, other = 0, 1, 5  # query at (0, 0); keys at (0, 1) (the subject) and (0, 5) (background)
    rate = 0.3 * (1 - 0.25)
    row = logits[1, :, q]
    torch.testing.assert_close(bias[1, :, q, same], rate * (row.amax(-1) - row[:, same]))
    torch.testing.assert_close(bias[1, :, q, other], -rate * (row[:, other] - row.amin(-1)))
    assert PoseGuide([5], masks[:1], 1.0, 4, bias_rule="fixed", self_strength=0.3).self_bias(query, key, 0.5) is None


def test_guided_columns_pair_handles_and_mask_tokens_and_skip_blank_poses():
    poses = torch.zeros(3, 4, 4)
    poses[0, 0] = 1
    poses[2, 3] = 1  # handle 1 has the blank pose
    text_ids = [49406, 10, 500, 11, 501, 12, 502, 49407] + [49407] * 69
    columns, masks, subjects = guided_columns(text_ids, [500, 501, 502], poses, mask_token_start=77)
    assert columns == [2, 77, 6, 79] and subjects == [0, 0, 2, 2]
    assert torch.equal(masks, torch.stack([poses[0], poses[0], poses[2], poses[2]]))
    columns, _, subjects = guided_columns(text_ids, [500, 501, 502], poses, mask_token_start=None)
    assert columns == [2, 6] and subjects == [0, 2]


def test_energy_is_zero_inside_and_grows_outside():
    masks = torch.zeros(1, 8, 8)
    masks[0, :, :4] = 1
    inside = torch.zeros(1, 8, 8)
    inside[0, :, :4] = 1
    outside = 1 - inside
    assert attention_energy(inside, masks) == 0
    assert attention_energy(outside, masks) == 1
    assert 0 < attention_energy(torch.ones(1, 8, 8), masks) < 1


def test_layout_energy_squares_each_head_then_averages_and_weighs_subjects_alike():
    from lowmcgm.sampling.latent_guidance import layout_energy

    masks = torch.zeros(3, 8, 8)
    masks[:2, :, :4] = 1  # subject 0 (a handle and its mask token): the left half
    masks[2, :, 4:] = 1  # subject 1: the right half
    left, right = masks[0] / masks[0].sum(), masks[2] / masks[2].sum()
    # Subject 0: head 0 inside, head 1 outside, on both columns; subject 1 inside on both heads.
    maps = torch.stack([torch.stack([left, left, right]), torch.stack([right, right, right])])[None]  # (1, 2, 3, 8, 8)
    energy = layout_energy([maps], masks, [0, 0, 1])
    assert energy.shape == (1,) and float(energy) == pytest.approx((0.5 + 0.0) / 2)  # heads averaged after squaring
    assert float(attention_energy(maps[0].mean(0), masks)) == pytest.approx(2 * 0.25)  # the maps averaged first
    # Two layers: their mean.
    assert float(layout_energy([maps, torch.flip(maps, [1])], masks, [0, 0, 1])) == pytest.approx(0.25)
    # Separation: subject 0's head 1 sits wholly in subject 1's mask.
    assert float(layout_energy([maps], masks, [0, 0, 1], separation=2.0)) == pytest.approx((0.5 + 2.0 * 0.5) / 2)


def test_presence_scores_a_subject_lost_to_another_and_not_one_that_wins_its_mask():
    # Issue 26: with two subjects, one handle often takes both masks and the other subject is lost.
    from lowmcgm.sampling.latent_guidance import layout_energy, presence_miss

    masks = torch.zeros(2, 8, 8)
    masks[0, :, :4] = 1  # subject 0: the left half
    masks[1, :, 4:] = 1  # subject 1: the right half
    flat, owner = masks.flatten(1), torch.tensor([0, 1])
    each_in_its_own = (flat / 32)[None]  # (B=1, S=2, n)
    assert presence_miss(each_in_its_own, flat, owner, [0, 1]).tolist() == [[0.0, 0.0]]
    lost = torch.stack([torch.full((64,), 0.1 / 64), torch.full((64,), 0.9 / 64)])[None]  # subject 1 everywhere
    assert presence_miss(lost, flat, owner, [0, 1])[0].tolist() == pytest.approx([0.9, 0.1])
    maps = lost.view(1, 1, 2, 8, 8)  # (B, heads, S, h, w)
    plain = float(layout_energy([maps], masks, [0, 1]))
    assert float(layout_energy([maps], masks, [0, 1], presence=2.0)) == pytest.approx(plain + 2.0 * (0.9 + 0.1) / 2)
    alone = maps[:, :, :1]  # one subject has no one to lose to: no term
    assert float(layout_energy([alone], masks[:1], [0], presence=2.0)) == float(layout_energy([alone], masks[:1], [0]))


def test_presence_adds_to_the_normalized_rule_and_needs_two_subjects():
    masks = torch.zeros(2, 8, 8)
    masks[0, :, :4] = 1
    masks[1, :, 4:] = 1
    lost = torch.stack([torch.full((8, 8), 0.1 / 64), torch.full((8, 8), 0.9 / 64)])  # subject 1 everywhere
    plain = float(attention_energy(lost, masks))
    assert float(attention_energy(lost, masks, [0, 1], presence=2.0)) == pytest.approx(plain + 2.0 * (0.9 + 0.1))
    own = torch.stack([masks[0] / 32, masks[1] / 32])  # each wins its own half: nothing to add
    assert float(attention_energy(own, masks, [0, 1], presence=2.0)) == pytest.approx(0.0)
    # A handle and its mask token are one subject: no one to lose to, no term.
    assert float(attention_energy(lost, masks, [0, 0], presence=2.0)) == pytest.approx(plain)


def test_noise_scaled_only_terms_are_refused_with_the_normalized_step():
    from lowmcgm.config import SampleSettings, sample_problems

    for key, value in (("pose_guidance_separation", 1.0), ("pose_guidance_area_normalized", True),
                       ("pose_guidance_layers", "mid-up")):
        problems = sample_problems(SampleSettings(**{key: value}))
        assert any(key in p and "noise-scaled step only" in p for p in problems), problems
        assert sample_problems(SampleSettings(**{key: value, "pose_guidance_step": "noise-scaled"})) == []
    assert sample_problems(SampleSettings(pose_guidance_presence=3.0)) == []  # presence works with either step


def test_area_normalised_energy_scores_evenly_spread_attention_one_whatever_the_mask():
    from lowmcgm.sampling.latent_guidance import layout_energy

    even = torch.full((1, 1, 1, 8, 8), 1 / 64)
    for rows in (1, 2, 6):
        masks = torch.zeros(1, 8, 8)
        masks[0, :rows] = 1
        plain = float(layout_energy([even], masks, [0]))
        assert plain == pytest.approx((1 - rows / 8) ** 2)  # a large mask scores well by spreading
        assert float(layout_energy([even], masks, [0], area_normalized=True)) == pytest.approx(1.0)


def test_masks_pool_to_a_non_square_layer_in_its_layout():
    """A 64x96 image: its latent / 4 layer (of the tiny model) has 16x24 queries, a coarser one 2x3."""
    masks = torch.zeros(1, 64, 96)
    masks[0, :, :32] = 1  # the left third
    guide = PoseGuide(columns=[5], masks=masks, strength=2.0, steps=4, bias_rule="fixed")
    column = guide.bias(*_query_key(1, 16 * 24, 10), scale=0.5)[0, 0, :, 5].reshape(16, 24)
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


def test_dense_attention_guidance_raises_the_share_inside_and_self_attention_changes_the_image(files, sampler):
    plan = _plan(files)
    off = _share_inside(sampler, plan, SETTINGS, "<asset0>")
    dense = dataclasses.replace(SETTINGS, pose_guidance="attention", pose_guidance_bias="dense")
    assert _share_inside(sampler, plan, dense, "<asset0>") > off + 0.02
    with_self = dataclasses.replace(dense, pose_guidance_self_attention=0.3)
    images = [np.asarray(sampler.generate(plan, [5], s)[0]).astype(int) for s in (dense, with_self)]
    assert np.abs(images[0] - images[1]).max() > 0
    assert all(type(p).__name__ != "GuidedSelfAttnProcessor" for p in sampler.pipe.unet.attn_processors.values())


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


def test_every_guidance_rule_has_a_default_strength():
    from lowmcgm.config import config_field
    from lowmcgm.sampling.pose_guidance import DEFAULT_STRENGTH

    rules = {*config_field("sample.pose_guidance_bias")[0].metadata["choices"],
             *config_field("sample.pose_guidance_step")[0].metadata["choices"]}
    assert set(DEFAULT_STRENGTH) == rules


def _tiny_guidance(settings=SampleSettings(), **guide):
    from lowmcgm.sampling.latent_guidance import LatentGuidance, guidance_layers

    base = build_tiny_base("tiny")
    unet = base.unet.requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 32, 32, generator=gen)
    context = torch.randn(1, 78, unet.config.cross_attention_dim, generator=gen)
    masks = torch.zeros(2, 64, 64)
    masks[:, 8:40, 16:48] = 1
    scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)
    scheduler.set_timesteps(10)

    def make(**kwargs):
        return LatentGuidance(unet, guidance_layers(unet, settings.pose_guidance_layers), context,
                              PoseGuide([5, 77], masks, **({"strength": 10.0, "steps": 4} | guide)), settings, **kwargs)
    return unet, latents, scheduler, make


@pytest.mark.parametrize("rule", ["normalized", "noise-scaled"])
def test_latent_guidance_steps_alike_with_and_without_checkpointing(rule):
    # Checkpointing (the default) recomputes the blocks in the backward, captures included: the
    # step must be the one the stored activations give, and the UNet is left as it was found.
    unet, latents, scheduler, make = _tiny_guidance(SampleSettings(pose_guidance_step=rule))
    before = dict(unet.attn_processors)
    t = scheduler.timesteps[2]
    steps = [make(checkpointing=on).step(latents, t, scheduler) for on in (False, True)]
    assert not torch.equal(steps[0], latents)  # it guided
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-5, atol=1e-6)
    assert not unet.is_gradient_checkpointing and dict(unet.attn_processors) == before


@pytest.mark.parametrize("layers", ["loss", "down", "mid-up"])
def test_latent_guidance_pass_stops_after_the_guided_layers_with_the_same_step(layers):
    from lowmcgm.sampling.latent_guidance import guidance_layers, last_block

    # The noise-scaled rule reads each layer at its own size (mid-up mixes two sizes).
    unet, latents, scheduler, make = _tiny_guidance(SampleSettings(pose_guidance_step="noise-scaled",
                                                                   pose_guidance_layers=layers))
    last = last_block(guidance_layers(unet, layers))
    order = [f"up_blocks.{i}" for i in range(len(unet.up_blocks))] + ["conv_out"]
    # tiny (SD 1.5 shrunk): up blocks after the last guided one; "down" runs none of them
    expected = order[:order.index(last) + 1] if last in order else []
    assert len(expected) < len(order) - 1 and (layers == "down") == (expected == [])
    ran = []
    hooks = [unet.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: ran.append(name))
             for name in order]
    t = scheduler.timesteps[2]
    try:
        for checkpointing in (False, True):
            ran.clear()
            cut = make(checkpointing=checkpointing).step(latents, t, scheduler)
            assert ran == expected, ran  # nothing after the last guided layer's block
            ran.clear()
            whole = make(checkpointing=checkpointing, truncated=False).step(latents, t, scheduler)
            assert ran == order
            assert not torch.equal(cut, latents) and torch.equal(cut, whole)
    finally:
        for hook in hooks:
            hook.remove()
    assert last_block(["down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor",
                       "mid_block.attentions.0.transformer_blocks.0.attn2.processor"]) == "mid_block"
    assert last_block(["up_blocks.10.attentions.0.transformer_blocks.0.attn2.processor",
                       "up_blocks.2.attentions.0.transformer_blocks.0.attn2.processor"]) == "up_blocks.10"


def test_noise_scaled_step_is_sigma_squared_times_the_gradient_on_ddim_and_euler():
    """layout-guidance's step, ``latents - grad * sigma_t^2`` on its k-diffusion latent, seen from
    DDIM's latent (the model input itself) is (1 - a_t) x the gradient; on Euler's, sigma_t^2."""
    from diffusers import EulerDiscreteScheduler

    from lowmcgm.sampling.latent_guidance import _noise_step_scale

    ddim = DDIMScheduler(num_train_timesteps=1000)
    ddim.set_timesteps(10)
    t = ddim.timesteps[3]
    alpha = float(ddim.alphas_cumprod[int(t)])
    assert _noise_step_scale(ddim, t) == pytest.approx(1 - alpha)
    euler = EulerDiscreteScheduler(num_train_timesteps=1000)
    euler.set_timesteps(10)
    t = euler.timesteps[3]
    alpha = float(euler.alphas_cumprod[int(t)])
    assert _noise_step_scale(euler, t) == pytest.approx((1 - alpha) / alpha, rel=1e-4)


def test_noise_scaled_guidance_lowers_the_energy_and_stops_at_the_threshold():
    settings = SampleSettings(pose_guidance_step="noise-scaled", pose_guidance_iterations=3)
    unet, latents, scheduler, make = _tiny_guidance(settings, strength=3000.0)
    t = scheduler.timesteps[1]
    guidance = _measured(make())
    guidance.step(latents, t, scheduler)
    energies = [float(e) for e in guidance.energies]
    assert len(energies) == 3 and energies[2] < energies[0], energies
    # Above every energy: nothing moves, one pass measured it.
    _, _, _, make = _tiny_guidance(dataclasses.replace(settings, pose_guidance_threshold=1.0), strength=3000.0)
    still = _measured(make())
    assert torch.equal(still.step(latents, t, scheduler), latents) and len(still.energies) == 1


def _measured(guidance):
    """``guidance``, recording the (B,) energy of each UNet pass it makes in ``guidance.energies``."""
    real, guidance.energies = guidance._energy_and_grad, []

    def spy(*args):
        energy, grad = real(*args)
        guidance.energies.append(energy)
        return energy, grad

    guidance._energy_and_grad = spy
    return guidance
