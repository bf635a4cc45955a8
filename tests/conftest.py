"""Shared fixtures: a tiny photo with two concept masks, written as files; and how the suite runs:
two worker processes (pytest-xdist), one thread each."""

from __future__ import annotations

import os
from pathlib import Path

# One thread per worker, set before torch loads: two torch processes spinning two OpenMP threads each
# on two cores slow each other down a hundredfold. The workers, started later, inherit these.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)  # also where torch was imported before this file (by another plugin)

TEST_WORKERS = 2  # the cores of the machines the suite is timed on (README, "Tests")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """``pytest`` runs on TEST_WORKERS workers; ``-n N`` chooses (``-n 0``: one process), and so do
    ``-p no:xdist`` and ``--pdb``. Not ``addopts = "-n 2"`` in pyproject: with ``-p no:xdist`` that
    fails as an unknown option. Runs before xdist's own hook (conftests register after plugins)."""
    is_worker = hasattr(config, "workerinput")
    if (config.pluginmanager.hasplugin("xdist") and not is_worker and config.option.numprocesses is None
            and config.option.dist == "no" and not config.getoption("usepdb")):
        config.option.numprocesses = TEST_WORKERS


# Started first: the workers take tests in collection order, and the browser's whole-flow test (10-15
# minutes on 2 cores, alphabetically near the end) started last was the suite's tail, running on
# one worker after the other had run out of tests (a 36-minute suite here; that test took 882 s).
START_FIRST = ("tests/test_ui_browser.py::test_paint_train_pose_sample_and_export",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid not in START_FIRST)  # stable: the rest keep their order


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


def write_box_masks(folder, boxes, size):
    """One white rectangle per box (x0, y0, x1, y1) on black, as m0.png, m1.png, ...; returns {"m0": path, ...}."""
    paths = {}
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        mask = np.zeros((size, size), np.uint8)
        mask[y0:y1, x0:x1] = 255
        paths[f"m{i}"] = folder / f"m{i}.png"
        Image.fromarray(mask).save(paths[f"m{i}"])
    return paths


SDXL_HANDLES = ["<asset0>", "<asset1>"]
LORA_B_STD = 0.3  # trained tiny LoRAs barely move (|B| ~ 0.02): scale up so alpha visibly matters


def make_tiny_artifact(path, seed=0):
    """An artifact of ``tiny`` (<asset0>, <asset1>, mask encoder, LoRA), made without training, at ``path``."""
    from lowmcgm.artifact import save_artifact
    from lowmcgm.config import LoraConfig
    from lowmcgm.mcgm import MCGMState
    from lowmcgm.models.tiny import build_tiny_base

    base = build_tiny_base("tiny")
    state = MCGMState.install(base, ["<asset0>", "<asset1>"], ["dog", "cat"], use_mask_tokens=True, seed=seed)
    state.add_adapters(base, LoraConfig(rank=2, alpha=2.0), "cpu")
    meta = {"base_model": base.name, "base_model_hash": base.config_hash, "base_model_version": base.version_tag,
            "text_width": base.text_width, "prediction_type": base.prediction_type, "resolution": base.resolution,
            "init_words": ["dog", "cat"]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_artifact(state.to_artifact(base, meta), path, dtype="fp32")
    return Path(path)


def make_sdxl_artifact(path, use_text_encoder_lora=False, rank=4, alpha=8.0):
    """An SDXL artifact of ``tiny-xl`` (two handles, mask encoder, UNet LoRA), made without training.

    Both encoders' handle rows are moved apart (differently, so a swapped pair shows) and the LoRA
    up weights drawn: at their zero init every LoRA check would pass whatever the export wrote.
    """
    from lowmcgm.artifact import save_artifact
    from lowmcgm.config import LoraConfig
    from lowmcgm.mcgm import MCGMState
    from lowmcgm.models.tiny import build_tiny_base

    base = build_tiny_base("tiny-xl")
    state = MCGMState.install(base, SDXL_HANDLES, ["dog", "cat"], use_mask_tokens=True, seed=0)
    state.add_adapters(base, LoraConfig(rank=rank, alpha=alpha, use_text_encoder_lora=use_text_encoder_lora), "cpu")
    meta = {"base_model": base.name, "base_model_hash": base.config_hash, "base_model_version": base.version_tag,
            "text_width": base.text_width, "prediction_type": base.prediction_type, "resolution": base.resolution,
            "init_words": ["dog", "cat"]}
    artifact = state.to_artifact(base, meta)
    gen = torch.Generator().manual_seed(1)
    artifact.handle_vector_sets[0] += 0.3 * torch.randn(artifact.handle_vector_sets[0].shape, generator=gen)
    artifact.handle_vector_sets[1] += 0.3 * torch.randn(artifact.handle_vector_sets[1].shape, generator=gen)
    for lora in (artifact.unet_lora, artifact.text_encoder_lora):
        for key in lora:
            if ".lora_B." in key:
                lora[key] = torch.randn(lora[key].shape, generator=gen) * LORA_B_STD
    save_artifact(artifact, path, dtype="fp32")
    return path


@torch.no_grad()
def pooled_written_out(tokenizer_2, text_encoder_2, prompts: list[str]) -> torch.Tensor:
    """SDXL's pooled embedding as SDXL was trained and ComfyUI and A1111 take it, written out apart
    from lowmcgm's code: the second encoder's final hidden state (after its last layer norm) at each
    prompt's first end-of-text token, projected. (B, projection_dim)."""
    ids = tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = text_encoder_2(ids).last_hidden_state  # (B, 77, d)
    ends = torch.tensor([row.tolist().index(tokenizer_2.eos_token_id) for row in ids])
    return text_encoder_2.text_projection(hidden[torch.arange(len(prompts)), ends])
