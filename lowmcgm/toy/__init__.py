"""The toy world: a small world where the method can be measured without a user study or a GPU.

Independent of the method; the method's code never imports it (only ``models`` loads the bundled
model by name, ``--base-model toy``).

- ``silhouettes``: a subject (dog, cat, bird, person) in a pose: pose tables, shapes, placement,
  and drawing it as a mask.
- ``scenes``: procedural scenes (image, one mask per subject, caption) drawn from a seed:
  backgrounds, palettes, rendering, sampling, captions.
- ``metrics``: segments any image of this world, rendered or generated, back into background
  class, subject kind and silhouette.
- ``bundled``: the toy base model shipped in ``weights/`` (a tiny Stable Diffusion trained on
  these scenes by ``tools/train_toy_base.py``) and its ``toyworld.json``.
- ``demo``: ``lowmcgm demo``, MCGM on a toy photo with drawn poses.
"""

from lowmcgm.toy.scenes import (
    BACKGROUNDS,
    HELDOUT_COMBOS,
    VOCABULARY,
    Scene,
    caption,
    caption_variant,
    render_scene,
    sample_scene,
    scene_combos,
)
from lowmcgm.toy.silhouettes import (
    KINDS,
    POSES,
    Subject,
    render_pose_mask,
    sample_offsets,
    subject_bbox,
)

__all__ = [
    "BACKGROUNDS", "HELDOUT_COMBOS", "KINDS", "POSES", "VOCABULARY", "Scene", "Subject", "caption",
    "caption_variant",
    "render_pose_mask", "render_scene", "sample_offsets", "sample_scene", "scene_combos",
    "subject_bbox",
]
