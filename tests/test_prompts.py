"""Prompts and poses: parsing ``--pose`` and ``--prompts FILE``, pairing each pose with its handle by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowmcgm.errors import UserError
from lowmcgm.sampling.prompts import (Pose, PromptSpec, fit_pose_masks, load_prompts_file, parse_poses,
                                      plan_prompts)


@pytest.fixture
def masks(tmp_path: Path) -> list[Path]:
    """Three 64 px pose files, one rectangle each."""
    paths = []
    for i, (x0, y0, x1, y1) in enumerate([(4, 4, 24, 40), (30, 10, 60, 30), (10, 44, 54, 62)]):
        mask = np.zeros((64, 64), np.uint8)
        mask[y0:y1, x0:x1] = 255
        Image.fromarray(mask).save(tmp_path / f"m{i}.png")
        paths.append(tmp_path / f"m{i}.png")
    return paths


def test_pose_precedence_line_then_global_then_blank(masks):
    m = {i: str(masks[i]) for i in range(3)}
    spec = PromptSpec("<asset0> <asset1> <asset2>", {"<asset0>": m[0], "all": m[1]})
    plan = plan_prompts([spec], {"<asset2>": m[2], "all": m[0]}, ["<asset0>", "<asset1>", "<asset2>"], None)[0]
    assert plan.pose_files == [m[0], m[1], m[1]]  # the line's own all= beats a global pose
    plan = plan_prompts([PromptSpec("<asset0> <asset1> <asset2>")], {"<asset2>": m[2]},
                        ["<asset0>", "<asset1>", "<asset2>"], None)[0]
    assert plan.pose_files == [None, None, m[2]]


def test_a_pose_given_as_an_array_plans_as_its_file_does(masks):
    # Issue 25: the page and the pose benchmark pass their masks as arrays, not as files read back.
    drawn = np.asarray(Image.open(masks[1])) > 127
    from_file = plan_prompts([PromptSpec("<asset0> <asset1>", {"<asset1>": str(masks[1])})], {},
                             ["<asset0>", "<asset1>"], None)[0]
    from_array = plan_prompts([PromptSpec("<asset0> <asset1>", {"<asset1>": Pose(drawn, "drawn on the page")})], {},
                              ["<asset0>", "<asset1>"], None)[0]
    assert from_array.pose_files == [None, "drawn on the page"]  # the name records and messages show
    assert np.array_equal(from_array.pose_masks[1], from_file.pose_masks[1])
    assert np.array_equal(fit_pose_masks(from_array, 32, 32), fit_pose_masks(from_file, 32, 32))
    assert fit_pose_masks(from_array, 32, 32) is fit_pose_masks(from_array, 32, 32)  # fitted once per size
    for bad, fragment in ((np.zeros((8, 8), bool), "Pose blank for <asset0> is empty"),
                          (np.ones((8, 8, 3)), r"not a 2-D mask \(its shape is \[8, 8, 3\]\)")):
        with pytest.raises(UserError, match=fragment):
            plan_prompts([PromptSpec("<asset0>")], {"<asset0>": Pose(bad, "blank")}, ["<asset0>"], None)
    with pytest.raises(UserError, match="the pose <asset0>=drawn"):  # named as a file would be
        plan_prompts([PromptSpec("<asset0>")], {"<asset0>": Pose(drawn, "drawn")}, ["<asset0>"], "--no-mask drops")


def test_fit_pose_masks_covers_and_center_crops():
    tall = np.zeros((40, 20), bool)
    tall[:, :10] = True  # left half
    plan = plan_prompts([PromptSpec("<asset0>")], {}, ["<asset0>"], None)[0]
    plan.pose_masks = [tall]
    fitted = fit_pose_masks(plan, 16, 16)
    assert fitted.shape == (1, 16, 16)
    assert fitted[0, :, :8].all() and not fitted[0, :, 8:].any()
    assert fit_pose_masks(plan, 16, 16) is fitted  # fitted once per size
    plan.pose_masks = [~tall]  # other masks: fitted again, never the old ones
    assert fit_pose_masks(plan, 16, 16)[0, :, 8:].all() and not fit_pose_masks(plan, 16, 16)[0, :, :8].any()
    # Arrays made and dropped in turn often get the id of the one before: still fitted again.
    for i in range(20):
        plan.pose_masks = []  # the last array freed first, so that the next one may take its id
        half = np.zeros((40, 20), bool)
        half[:, slice(0, 10) if i % 2 == 0 else slice(10, 20)] = True
        plan.pose_masks = [half]
        fitted = fit_pose_masks(plan, 16, 16)
        assert bool(fitted[0, :, 0].all()) == (i % 2 == 0), i


def test_parse_poses_and_prompts_file(tmp_path):
    assert parse_poses(["asset0=a.png", "<asset1>=b.png", "all=c.png"]) == {
        "<asset0>": "a.png", "<asset1>": "b.png", "all": "c.png"}
    for bad, fragment in [("asset0", "HANDLE=FILE"), ("=a.png", "HANDLE=FILE"), ("as set=a.png", "not a handle")]:
        with pytest.raises(UserError, match=fragment):
            parse_poses([bad])
    (tmp_path / "p.txt").write_text("# poses relative to this file\n\na photo of <asset0> | asset0=run.png\n"
                                    "a photo of <asset1> and <asset0>|all=/abs/sit.png | asset1 = x.png\n")
    specs = load_prompts_file(tmp_path / "p.txt")
    assert [s.text for s in specs] == ["a photo of <asset0>", "a photo of <asset1> and <asset0>"]
    assert specs[0].poses == {"<asset0>": str(tmp_path / "run.png")}
    assert specs[1].poses == {"all": "/abs/sit.png", "<asset1>": str(tmp_path / "x.png")}
    assert specs[1].where == "p.txt line 4"
