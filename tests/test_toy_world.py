"""The toy world: scene generation, captions, segmentation metrics, and the toy base trainer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lowmcgm.models.tokenizer import build_clip_tokenizer
from lowmcgm.toy import metrics
from lowmcgm.toy.scenes import (BACKDROPS, BACKGROUNDS, FAR_SHADE, HELDOUT_COMBOS, PALETTES, VOCABULARY, Scene, caption,
                                render_scene, sample_scene, scene_combos)
from lowmcgm.toy.silhouettes import KINDS, POSES, Subject, render_pose_mask, sample_offsets
from tools_loader import load_tool

REPO = Path(__file__).resolve().parents[1]


def _scenes(seed: int, n: int, **kwargs) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


def test_same_seed_gives_same_scene_and_pixels():
    a, b = _scenes(3, 5), _scenes(3, 5)
    assert a == b
    for sa, sb in zip(a, b):
        ia, ma = render_scene(sa)
        ib, mb = render_scene(sb)
        assert np.array_equal(ia, ib)
        assert all(np.array_equal(x, y) for x, y in zip(ma, mb))
    assert _scenes(4, 5) != a


def test_masks_are_the_subjects_pixels():
    for scene in _scenes(0, 40):
        image, masks = render_scene(scene)
        assert len(masks) == len(scene.subjects)
        union = np.zeros(image.shape[:2], bool)
        for subject, mask in zip(scene.subjects, masks):
            assert mask.dtype == bool and mask.shape == image.shape[:2]
            assert mask.sum() > 20, caption(scene)
            assert not (union & mask).any(), "visible masks must not overlap"
            union |= mask
            # Most of a subject's pixels carry its own kind's colours.
            labels = metrics.kind_labels(image, mask)
            assert np.mean(labels[mask] == KINDS.index(subject.kind)) > 0.8
        assert union.mean() < 0.6
        fg = metrics.foreground_mask(image, scene.background)
        assert metrics.iou(fg, union) > 0.95


def test_captions_use_vocabulary_words():
    for scene in _scenes(1, 50):
        text = caption(scene)
        assert text.startswith("a photo of a ")
        assert set(text.split()) <= set(VOCABULARY), text
    two = Scene("beach", [Subject("dog", "running"), Subject("cat", "sitting")])
    assert caption(two) == "a photo of a dog running on the beach and a cat sitting"


def test_caption_wordings():
    two = Scene("snow", [Subject("dog", "running"), Subject("cat", "sitting")])
    assert caption(two, pose_words=False, place="end") == "a photo of a dog and a cat in the snow"
    assert caption(two, place="end") == "a photo of a dog running and a cat sitting in the snow"
    assert caption(two, pose_words=False, place=None) == "a photo of a dog and a cat"
    with pytest.raises(ValueError, match="place"):
        caption(two, place="middle")


def test_caption_variants_cover_every_wording_at_their_rates():
    from lowmcgm.toy.scenes import PLACE_RATES, POSE_WORD_RATE, caption_variant

    rng = np.random.default_rng(3)
    scene = Scene("beach", [Subject("bird", "jumping")])
    texts = [caption_variant(scene, rng) for _ in range(2000)]
    assert set(" ".join(texts).split()) <= set(VOCABULARY)
    with_pose = np.mean(["jumping" in t for t in texts])
    with_place = np.mean(["beach" in t for t in texts])
    assert abs(with_pose - POSE_WORD_RATE) < 0.04
    assert abs(with_place - (1 - PLACE_RATES[None])) < 0.04
    assert "a photo of a bird on the beach" in texts and "a photo of a bird" in texts


def test_vocabulary_words_are_single_tokens():
    tokenizer = build_clip_tokenizer(VOCABULARY)
    for word in VOCABULARY:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, (word, tokenizer.tokenize(word))  # BOS, the word, EOS
    text = caption(Scene("street", [Subject("person", "standing"), Subject("cat", "lying")]))
    assert len(tokenizer(text).input_ids) == len(text.split()) + 2


@pytest.mark.parametrize("kind", KINDS)
def test_lying_is_wider_than_sitting(kind):
    rng = np.random.default_rng(7)

    def ratios(pose):
        return [metrics.pose_ratio(render_pose_mask(kind, pose, 64,
                                                    offsets=sample_offsets(rng, kind, pose)))
                for _ in range(15)]

    lying, sitting = np.mean(ratios("lying")), np.mean(ratios("sitting"))
    assert lying < 0.75 * sitting, (lying, sitting)


@pytest.mark.parametrize("kind", KINDS)
def test_limbs_survive_a_3px_opening(kind):
    # Features thinner than 3 px vanish under a 3x3 opening; the silhouettes should barely change.
    for pose in POSES:
        mask = render_pose_mask(kind, pose, 64, scale=0.3)
        opened = ndimage.binary_opening(mask, structure=np.ones((3, 3)))
        assert opened.sum() >= 0.85 * mask.sum(), (kind, pose, opened.sum() / mask.sum())


def test_metrics_read_rendered_scenes():
    scenes = _scenes(11, 60, n_subjects=1)
    bg_ok = kind_ok = 0
    for scene in scenes:
        image, masks = render_scene(scene)
        background = metrics.classify_background(image)
        fg = metrics.foreground_mask(image, background)
        bg_ok += background == scene.background
        kind_ok += metrics.classify_kind(image, fg) == scene.subjects[0].kind
        assert metrics.iou(fg, masks[0]) > 0.9
        assert metrics.pose_ratio(fg) == pytest.approx(metrics.pose_ratio(masks[0]), rel=0.05)
    assert bg_ok / len(scenes) >= 0.95 and kind_ok / len(scenes) >= 0.95
    empty = render_scene(Scene("snow", []))[0]
    empty_fg = metrics.foreground_mask(empty, "snow")
    assert metrics.classify_kind(empty, empty_fg) == metrics.NO_SUBJECT


def test_every_background_is_recognised():
    for background in BACKGROUNDS:
        for scene in _scenes(5, 4, backgrounds=[background]):
            assert metrics.classify_background(render_scene(scene)[0]) == background


def test_palettes_are_far_apart():
    # Segmentation rests on this: subject colours (shaded too) are far from background colours.
    for kind, palette in PALETTES.items():
        for colour in palette:
            for shade in (1.0, FAR_SHADE):
                c = np.asarray(colour) * shade
                for name, drop in BACKDROPS.items():
                    d = min(np.linalg.norm(c - np.asarray(b)) for b in drop.colours)
                    assert d >= 55, (kind, colour, name, d)


def test_iou_hand_case():
    a = np.array([[1, 1], [0, 0]], bool)
    b = np.array([[1, 0], [1, 0]], bool)
    assert metrics.iou(a, b) == pytest.approx(1 / 3)
    assert metrics.iou(a, a) == 1.0
    assert metrics.iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


POSE_METRIC_DATA = REPO / "tests" / "data" / "pose_metric"  # where they come from: its README.md


def _png(name: str) -> np.ndarray:
    return np.asarray(Image.open(POSE_METRIC_DATA / name).convert("RGB"))


@pytest.mark.parametrize("name", ["s1-p00-t1-mcgm_aware", "s1-p00-t1-mcgm_aware+attention"])
def test_a_dog_on_an_off_shade_sky_counts_as_drawn(name):
    # Issue 26: a big brown dog under a sky 55 RGB units darker than the palette's beach sky. The
    # sky used to count as foreground (85% of the image), which read as noise: "not drawn", IoU 0.
    bench = load_tool("bench_pose")
    photo = bench.make_photos(1, 1, targets=2, size_px=64, seed=0)[0]
    target = photo.targets[1]
    assert (target.masks[0] == (_png("s1-p00-t1-target.png")[..., 0] > 127)).all()  # the figure's photo
    image = _png(f"{name}.png")
    figures = bench.measure(image, photo, target)
    assert figures["background"] == target.background and figures["main_kind"] == "dog"
    assert figures["drawn"] == [True]
    # A blob covering a third of the image against a jumping dog's mask: low, but not nothing.
    assert 0.03 < figures["iou"][0] < 0.3
    fg = metrics.foreground_mask(image, figures["background"])
    assert 0.25 < fg.mean() < 0.6  # the dog and the sea, not the sky
    for other in ("cat", "bird"):  # the dog's colours are no other kind's
        assert not metrics.subject_drawn(image, fg, metrics.kind_mask(image, fg, other))


def _noise(smooth_px: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (64 // smooth_px, 64 // smooth_px, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((64, 64), Image.Resampling.BILINEAR))


def _wash() -> np.ndarray:
    image = render_scene(Scene("beach", []))[0].copy()
    image[4:] = PALETTES["dog"][0]  # all but the top rows in the dog's main colour
    return image


def _half_noise() -> np.ndarray:
    """A blank beach with its lower three quarters smoothed noise: 73% foreground, under the wash
    rule's 80%, so only the unexplained-foreground rule (30% here) reads it as noise."""
    image = render_scene(Scene("beach", []))[0].copy()
    image[16:] = _noise(8)[16:]
    return image


@pytest.mark.parametrize("image", [
    pytest.param(_noise(1), id="uniform-noise"),
    pytest.param(_noise(8), id="smooth-noise"),
    pytest.param(render_scene(Scene("beach", []))[0], id="blank-background"),
    pytest.param(_wash(), id="dog-coloured-wash"),
    pytest.param(_half_noise(), id="noise-below-the-sky"),
])
def test_noise_washes_and_empty_backgrounds_draw_nothing(image):
    background = metrics.classify_background(image)
    fg = metrics.foreground_mask(image, background)
    for kind in KINDS:
        assert not metrics.subject_drawn(image, fg, metrics.kind_mask(image, fg, kind)), kind


def test_rendered_subjects_are_drawn_and_other_kinds_are_not():
    for scene in _scenes(12, 20, n_subjects=1):
        image, masks = render_scene(scene)
        fg = metrics.foreground_mask(image, metrics.classify_background(image))
        kind = scene.subjects[0].kind
        assert metrics.subject_drawn(image, fg, metrics.kind_mask(image, fg, kind)), caption(scene)
        # A person's hair is the dark detail colour, nearest the dog's shaded second colour: a person
        # brings a dog-coloured blob along, so "dog" is not asked of a person.
        others = [k for k in KINDS if k != kind and not (kind == "person" and k == "dog")]
        for other in others:
            assert not metrics.subject_drawn(image, fg, metrics.kind_mask(image, fg, other)), (caption(scene), other)


def test_background_shades_come_from_the_image_unless_a_subject_fills_the_band():
    image = render_scene(Scene("beach", []))[0].copy()
    palette = np.asarray(BACKDROPS["beach"].colours, np.float32)
    shades = metrics.background_colours(image, "beach")[len(palette):]
    assert np.abs(shades - palette[:2]).max() < 8  # a rendered sky and ground: the palette's own
    image[:8] = (123, 160, 194)  # the bundled toy model's darker beach sky
    assert not metrics.foreground_mask(image, "beach")[:8].any()
    image[:8] = PALETTES["dog"][0]  # a dog filling the top band stays foreground
    assert len(metrics.background_colours(image, "beach")) == len(palette) + 1
    assert metrics.foreground_mask(image, "beach")[:8].all()


@pytest.mark.parametrize("size_px", [64, 256])
def test_renders_at_any_size(size_px):
    scene = _scenes(2, 1, n_subjects=2)[0]
    image, masks = render_scene(scene, size_px)
    assert image.shape == (size_px, size_px, 3) and image.dtype == np.uint8
    assert all(m.shape == (size_px, size_px) for m in masks)
    # The large render is a sharper copy of the small one, not another drawing.
    small = render_scene(scene, 64)[1]
    for big, little in zip(masks, small):
        pooled = big.reshape(64, size_px // 64, 64, size_px // 64).mean(axis=(1, 3)) > 0.5
        assert metrics.iou(pooled, little) > 0.85


def test_sample_scene_honours_restrictions_and_exclusions():
    for scene in _scenes(9, 150, exclude=HELDOUT_COMBOS):
        assert not scene_combos(scene) & set(HELDOUT_COMBOS)
    for scene in _scenes(9, 20, n_subjects=3, kinds=["cat"], poses=["jumping"],
                         backgrounds=["room"]):
        assert len(scene.subjects) == 3 and scene.background == "room"
        assert {(s.kind, s.pose) for s in scene.subjects} == {("cat", "jumping")}
    with pytest.raises(ValueError):
        sample_scene(np.random.default_rng(0), kinds=["dog"], poses=["standing"],
                     backgrounds=["grass"], exclude=HELDOUT_COMBOS)


def test_trainer_stages_resume_and_export(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    train = load_tool("train_toy_base")
    def opts(out: Path) -> list[str]:
        return ["--preset", "tiny", "--out", str(out), "--device", "cpu", "--log-every", "1"]

    common = opts(tmp_path)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = train.main(["--stage", "vae", "--steps", "2", *common])
        at_two, _ = train.load_checkpoint(tmp_path / "checkpoints" / "vae.safetensors")
        train.main(["--stage", "vae", "--steps", "2", *opts(tmp_path / "again")])
        twin, _ = train.load_checkpoint(tmp_path / "again" / "checkpoints" / "vae.safetensors")
        assert all(torch.equal(at_two[k], twin[k]) for k in at_two), "same seed, same weights"
        second = train.main(["--stage", "vae", "--steps", "3", *common])
        assert (first["start_step"], first["end_step"]) == (0, 2)
        assert (second["start_step"], second["end_step"]) == (2, 3)
        _, meta = train.load_checkpoint(tmp_path / "checkpoints" / "vae.safetensors")
        assert meta["step"] == 3 and meta["scaling_factor"] > 0
        assert (tmp_path / "model" / "vae" / "config.json").exists()
        assert not (tmp_path / "model" / "model_index.json").exists()

        train.main(["--stage", "unet", "--steps", "2", *common])
        resumed = train.main(["--stage", "unet", "--steps", "3", *common])
    finally:
        torch.set_num_threads(threads)
    assert (resumed["start_step"], resumed["end_step"]) == (2, 3)
    log = (tmp_path / "log_unet.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log]
    assert steps == [1, 2, 3]
    tensors, meta = train.load_checkpoint(tmp_path / "checkpoints" / "unet.safetensors")
    assert meta["step"] == 3 and any(k.startswith("ema.") for k in tensors)

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None,
                                                   requires_safety_checker=False)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.scheduler.config.steps_offset == 1
    assert not (tmp_path / "model" / "safety_checker").exists()
    info = json.loads((tmp_path / "model" / "toyworld.json").read_text())
    assert info["unet_step"] == 3 and info["attn_map_px"] == 16
    # Weights are stored in half precision.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"),
                   "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())


def test_trainer_switches_to_zero_terminal_snr_and_saves_the_schedule_it_trained(tmp_path, capsys):
    import torch
    from diffusers import StableDiffusionPipeline

    train = load_tool("train_toy_base")
    common = ["--preset", "tiny", "--out", str(tmp_path), "--device", "cpu", "--log-every", "1"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train.main(["--stage", "vae", "--steps", "1", *common])
        train.main(["--stage", "unet", "--steps", "2", "--leaky-schedule", *common])
        leaky = StableDiffusionPipeline.from_pretrained(tmp_path / "model").scheduler.config
        assert (leaky.prediction_type, leaky.rescale_betas_zero_snr) == ("epsilon", False)
        capsys.readouterr()
        train.main(["--stage", "unet", "--steps", "3", *common])  # the default: zero terminal SNR
        assert "switching the noise schedule at step 2" in capsys.readouterr().out
        # Re-exporting with the old recipe's flag still writes the schedule the weights were trained on.
        train.main(["--stage", "export", "--leaky-schedule", *common])
    finally:
        torch.set_num_threads(threads)
    config = StableDiffusionPipeline.from_pretrained(tmp_path / "model").scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert config.timestep_spacing == "trailing"
    scheduler = train.build_scheduler(train.ToyConfig(**train.PRESETS["tiny"]))
    assert float(scheduler.alphas_cumprod[-1]) == 0.0  # no signal left at t = 999
    weights = train.compute_snr_weights(scheduler, torch.tensor([0, 500, 999]), gamma=5.0)
    assert torch.isfinite(weights).all() and weights[-1] == 1.0  # v: min(SNR + 1, 5) / (SNR + 1)


def test_trainer_batches_depend_only_on_seed_and_step():
    train = load_tool("train_toy_base")
    cfg = train.ToyConfig(**train.PRESETS["tiny"])
    x1, t1 = train.render_batch(train.step_rng(cfg, "unet", 5), 2, 64, True)
    x2, t2 = train.render_batch(train.step_rng(cfg, "unet", 5), 2, 64, True)
    x3, _ = train.render_batch(train.step_rng(cfg, "unet", 6), 2, 64, True)
    assert t1 == t2 and bool((x1 == x2).all()) and not bool((x1 == x3).all())


def test_trainer_varies_caption_wording_without_changing_the_scenes():
    train = load_tool("train_toy_base")
    cfg = train.ToyConfig(**train.PRESETS["tiny"])
    batches = {}
    for variants in (False, True):
        dataset = train.StepBatches(dataclasses.replace(cfg, caption_variants=variants), "unet", 0, 8)
        batches[variants] = list(dataset)
    canonical = [t for _, _, texts in batches[False] for t in texts if t]
    varied = [t for _, _, texts in batches[True] for t in texts if t]
    assert all(bool((a[1] == b[1]).all()) for a, b in zip(batches[False], batches[True]))
    assert all(any(p in t for p in POSES) for t in canonical)
    assert any(not any(p in t for p in POSES) for t in varied), varied
