"""Photo and masks: every mask mode, binarising, joint crop, the checks, union sampling."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from lowmcgm.data import build_prompt, load_concept_image, load_mask, resize_masks, sample_concepts, \
    sample_num_concepts
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
