"""Write the bundled toy example: a dog and a cat on grass, their masks, and two target poses.

    python tools/make_examples.py [--out examples/dogcat] [--size 256]

Files (all ``--size`` square):

- ``photo.png``: RGB, a dog standing (left) and a cat lying (right) on grass. Both are held-out
  combinations (``HELDOUT_COMBOS``), so the toy base model never saw them captioned.
- ``dog.png``, ``cat.png``: L-mode masks (0 / 255) of the visible pixels of each subject.
- ``pose_sit.png``: a sitting dog's silhouette on the left half, where the dog is in the photo.
- ``pose_run.png``: a running cat's silhouette on the right half, where the cat is.
- ``scene.json``: the scene's parameters and caption, to re-render it at another size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowmcgm.toy.demo import DEMO_SCENE, POSES  # noqa: E402
from lowmcgm.toy.scenes import caption, render_scene, save_mask  # noqa: E402
from lowmcgm.toy.silhouettes import render_pose_mask  # noqa: E402

# The demo's scene (fixed subjects, so the example does not move if sampling changes).
SCENE = DEMO_SCENE
POSE_MASKS = {"pose_sit.png": POSES["dog_sitting"], "pose_run.png": POSES["cat_running"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("examples/dogcat"))
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    image, masks = render_scene(SCENE, args.size)
    Image.fromarray(image).save(args.out / "photo.png", optimize=True)
    for subject, mask in zip(SCENE.subjects, masks):
        save_mask(mask, args.out / f"{subject.kind}.png")
    for name, spec in POSE_MASKS.items():
        save_mask(render_pose_mask(size_px=args.size, **spec), args.out / name)
    meta = {"caption": caption(SCENE), "size_px": args.size, "scene": dataclasses.asdict(SCENE),
            "pose_masks": POSE_MASKS}
    (args.out / "scene.json").write_text(json.dumps(meta, indent=1) + "\n")
    overlap = (masks[0] & masks[1]).sum()
    print(f"wrote {args.out}: {caption(SCENE)!r}; mask pixels {[int(m.sum()) for m in masks]}, "
          f"overlap {int(overlap)}")


if __name__ == "__main__":
    main()
