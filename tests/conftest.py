"""Shared fixtures: a tiny photo with two concept masks, written as files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

# Two cores: parallel workers must not each spin two OpenMP threads.
torch.set_num_threads(1)


def make_photo(folder, size=96):
    """A green scene with an orange and a blue block; returns (photo, mask_a, mask_b) paths."""
    img = np.zeros((size, size, 3), np.uint8)
    img[:] = (40, 160, 60)
    a = np.zeros((size, size), np.uint8)
    b = np.zeros((size, size), np.uint8)
    s = size / 96
    a[int(20 * s):int(60 * s), int(10 * s):int(40 * s)] = 255
    b[int(40 * s):int(80 * s), int(55 * s):int(90 * s)] = 255
    img[a > 0] = (180, 120, 40)
    img[b > 0] = (90, 90, 200)
    paths = folder / "photo.png", folder / "a.png", folder / "b.png"
    Image.fromarray(img).save(paths[0])
    Image.fromarray(a).save(paths[1])
    Image.fromarray(b).save(paths[2])
    return tuple(str(p) for p in paths)


@pytest.fixture
def photo(tmp_path):
    return make_photo(tmp_path)
