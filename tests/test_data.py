"""Photo and masks: every mask mode, binarising, joint crop, the checks, union sampling."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from lowmcgm.data import apply_affine, build_encoder_masks, build_prompt, draw_affine, load_concept_image, \
    load_mask, perturb_mask, resize_masks, sample_concepts, sample_num_concepts
from lowmcgm.errors import UserError


def _square(size=40, lo=10, hi=30):
    m = np.zeros((size, size), bool)
    m[lo:hi, lo:hi] = True
    return m


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I;16", "1"])
def test_mask_modes(tmp_path, mode):
    m = _square()
    path = tmp_path / f"m.png"
    if mode == "RGBA":
        arr = np.zeros((40, 40, 4), np.uint8)
        arr[..., :3] = 255  # white everywhere: only alpha marks the subject
        arr[..., 3] = m * 255
        Image.fromarray(arr, "RGBA").save(path)
    elif mode == "LA":
        Image.fromarray((m * 255).astype(np.uint8)).convert("LA").save(path)
        img = Image.open(path).convert("RGBA")
        arr = np.asarray(img).copy()
        arr[..., 3] = m * 255
        arr[..., :3] = 0
        Image.fromarray(arr).convert("LA").save(path)
    elif mode == "I;16":
        Image.fromarray((m * 65535).astype(np.uint16)).save(path)
    elif mode == "P":
        Image.fromarray((m * 255).astype(np.uint8)).convert("P").save(path)
    else:
        Image.fromarray((m * 255).astype(np.uint8)).convert(mode).save(path)
    if mode == "I;16":
        assert Image.open(path).mode in ("I;16", "I")
    assert np.array_equal(load_mask(path) > 0.5, m)


def test_jpeg_mask_is_binarised(tmp_path):
    path = tmp_path / "m.jpg"
    Image.fromarray((_square() * 255).astype(np.uint8)).save(path, quality=70)
    assert ((load_mask(path) > 0.5) == _square()).mean() > 0.97


def test_joint_resize_and_crop_keeps_alignment(tmp_path):
    # A 120x80 photo: red where the mask is; after resize+center-crop both must still coincide.
    img = np.zeros((80, 120, 3), np.uint8)
    m = np.zeros((80, 120), np.uint8)
    m[20:60, 50:90] = 255
    img[m > 0] = (255, 0, 0)
    Image.fromarray(img).save(tmp_path / "p.png")
    Image.fromarray(m).save(tmp_path / "m.png")
    concept, warnings = load_concept_image(str(tmp_path / "p.png"), [str(tmp_path / "m.png")], 32)
    assert concept.image.shape == (3, 32, 32) and concept.masks.shape == (1, 32, 32) and not warnings
    red = concept.image[0] > 0.5
    mask = concept.masks[0] > 0.5
    assert (red == mask).float().mean() > 0.95
    assert set(concept.masks.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("case,fragment", [
    ("size", "must have the image's exact size"), ("empty", "is empty"), ("full", "covers the whole image"),
    ("missing", "not found"), ("not-image", "not an image"), ("truncated", "truncated"),
    ("outside-crop", "outside the central square"),
])
def test_bad_masks(tmp_path, photo, case, fragment):
    image, a, _ = photo
    bad = tmp_path / "bad.png"
    if case == "size":
        Image.new("L", (50, 40), 255).save(bad)
    elif case == "empty":
        Image.new("L", (96, 96), 0).save(bad)
    elif case == "full":
        Image.new("L", (96, 96), 255).save(bad)
    elif case == "not-image":
        bad.write_text("hello")
    elif case == "truncated":
        data = open(a, "rb").read()
        bad.write_bytes(data[: len(data) // 2])
    elif case == "outside-crop":
        wide = tmp_path / "wide.png"
        Image.new("RGB", (200, 96), (0, 0, 0)).save(wide)
        m = np.zeros((96, 200), np.uint8)
        m[:, :20] = 255
        Image.fromarray(m).save(bad)
        image = str(wide)
    with pytest.raises(UserError, match=fragment):
        load_concept_image(image, [str(bad)], 32)


def test_overlap_warns(tmp_path, photo):
    image, a, _ = photo
    _, warnings = load_concept_image(image, [a, a], 32)
    assert len(warnings) == 1 and "overlap" in warnings[0]


def test_union_sampling_is_uniform_in_k_and_order():
    g = torch.Generator().manual_seed(0)
    ks = Counter(sample_num_concepts(3, g) for _ in range(3000))
    assert set(ks) == {1, 2, 3} and min(ks.values()) > 900
    picks = [tuple(sample_concepts(3, 2, g)) for _ in range(600)]
    assert all(len(set(p)) == 2 for p in picks) and len(set(picks)) == 6  # every ordered pair occurs


def test_prompt_and_nearest_resize():
    assert build_prompt(["<asset2>", "<asset0>"]) == "a photo of <asset2> and <asset0>"
    m = torch.zeros(1, 2, 4, 4)
    m[0, 0, :2, :2] = 1
    small = resize_masks(m, 2)
    assert small.shape == (1, 2, 2, 2) and small[0, 0].tolist() == [[1, 0], [0, 0]]


# ------------------------------------------------------------------------------------------------
# Mask-aware training: affine augmentation, mask dropout, mask perturbation
# ------------------------------------------------------------------------------------------------

WIDE_AFFINE = dict(shift=0.3, scale_min=0.6, scale_max=1.5, rotate_deg=30.0)


def _orange(image):
    """Where the photo shows conftest's orange block (180, 120, 40), at any resampling."""
    target = torch.tensor([180, 120, 40]).view(3, 1, 1) / 127.5 - 1
    return (image - target).abs().amax(0) < 0.25


@pytest.mark.parametrize("seed", range(6))
def test_affine_moves_photo_and_masks_together(photo, seed):
    """Pixel check: after the same random move the orange pixels are still exactly mask a, and no
    subject left the frame (its area scaled by the move's scale squared, nothing cut off)."""
    image, a, b = photo
    concept, _ = load_concept_image(image, [a, b], 64)
    assert (_orange(concept.image) == (concept.masks[0] > 0.5)).float().mean() > 0.98  # bicubic edges
    g = torch.Generator().manual_seed(seed)
    theta = draw_affine(concept.masks, g, **WIDE_AFFINE)
    moved_image = apply_affine(concept.image, theta)
    moved_masks = apply_affine(concept.masks, theta, padding="zeros") > 0.5
    assert not torch.equal(moved_masks, concept.masks > 0.5)  # it did move
    agree = (_orange(moved_image) == moved_masks[0]).float()
    assert agree.mean() > 0.97  # disagreement only along the resampled boundary
    scale_sq = 1 / float(torch.linalg.det(theta[:, :2]))  # theta maps output to input: det = 1 / s^2
    for before, after in zip(concept.masks, moved_masks):
        assert float(after.sum()) == pytest.approx(float(before.sum()) * scale_sq, rel=0.03)


def test_affine_moves_latents_like_masks():
    """The latent path: a move of a latent-sized map (here the mask averaged over 8x8 blocks, as a
    latent sees the photo) is the averaged moved mask: one theta, any resolution."""
    masks = torch.zeros(1, 128, 128)
    masks[0, 30:90, 20:70] = 1
    theta = draw_affine(masks, torch.Generator().manual_seed(3), **WIDE_AFFINE)
    latent = torch.nn.functional.avg_pool2d(masks, 8)  # (1, 16, 16)
    moved_latent = apply_affine(latent, theta)
    moved_mask = (apply_affine(masks, theta, padding="zeros") > 0.5).float()
    assert (moved_latent - torch.nn.functional.avg_pool2d(moved_mask, 8)).abs().mean() < 0.05


def test_affine_draws_are_deterministic_and_content_independent():
    small, big = torch.zeros(1, 32, 32), torch.zeros(1, 32, 32)
    small[0, 10:12, 10:12] = 1
    big[0, 2:30, 1:31] = 1  # too big for any zoom-in: the scale is lowered, the draws stay four
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(draw_affine(small, g1, **WIDE_AFFINE), draw_affine(small, g2, **WIDE_AFFINE))
    draw_affine(big, g1, **WIDE_AFFINE)
    draw_affine(small, g2, **WIDE_AFFINE)
    assert torch.equal(g1.get_state(), g2.get_state())
    no_move = draw_affine(small, g1, shift=0.0, scale_min=1.0, scale_max=1.0, rotate_deg=0.0)
    torch.testing.assert_close(no_move, torch.tensor([[1.0, 0, 0], [0, 1, 0]], dtype=torch.float64))


def test_mask_dropout_blanks_masks_at_the_configured_rate():
    masks = torch.zeros(2, 96, 96)
    masks[0, 10:50, 10:40] = 1
    masks[1, 40:80, 50:90] = 1
    g = torch.Generator().manual_seed(0)
    blank = kept = 0
    for _ in range(2000):
        out = build_encoder_masks(masks, 64, dropout=0.15, perturbation=0.0, generator=g)
        assert out.shape == (2, 64, 64)
        for got, real in zip(out, resize_masks(masks, 64)):
            if not got.any():
                blank += 1
            else:
                assert torch.equal(got, real)  # a kept mask is the real one
                kept += 1
    assert blank / (blank + kept) == pytest.approx(0.15, abs=0.015)  # 4000 draws: ~0.006 std
    never = build_encoder_masks(masks, 64, dropout=0.0, perturbation=0.0, generator=g)
    assert torch.equal(never, resize_masks(masks, 64))


def _iou(a, b):
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum()) / float((a | b).sum())


def test_perturbation_roughens_the_mask_but_keeps_it_on_the_subject():
    mask = torch.zeros(64, 64)
    mask[14:40, 8:28] = 1
    mask[20:30, 28:40] = 1  # an L-shaped subject
    g = torch.Generator().manual_seed(0)
    ious = [_iou(perturb_mask(mask, 0.05, g), mask) for _ in range(300)]
    # Boundary moves of at most 3 px: an erosion keeps ~40% of this L (its arm is 10 px thick).
    assert min(ious) > 0.35 and sorted(ious)[len(ious) // 2] > 0.6
    assert sum(iou < 0.999 for iou in ious) > 0.8 * len(ious)  # almost always changed
    assert set(perturb_mask(mask, 0.05, g).unique().tolist()) <= {0.0, 1.0}
    dot = torch.zeros(64, 64)
    dot[30, 30] = 1  # erosion or a coarse redraw would empty it: those steps are skipped
    assert all(perturb_mask(dot, 0.1, g).any() for _ in range(50))
    assert torch.equal(perturb_mask(mask, 0.0, g), mask)
