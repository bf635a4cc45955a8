"""The toy world: procedural scenes with known subjects, poses and masks, and their segmentation.

``scenes`` draws scenes (image, one mask per subject, caption) deterministically from a seed;
``metrics`` segments any image of this world (rendered or generated) back into background class,
subject kind and silhouette. Together they let the method be measured without a user study.
"""

from lowmcgm.toyworld.scenes import (
    BACKGROUNDS,
    HELDOUT_COMBOS,
    KINDS,
    POSES,
    VOCABULARY,
    Scene,
    Subject,
    caption,
    caption_variant,
    render_pose_mask,
    render_scene,
    sample_offsets,
    sample_scene,
    scene_combos,
    subject_bbox,
)

__all__ = [
    "BACKGROUNDS", "HELDOUT_COMBOS", "KINDS", "POSES", "VOCABULARY", "Scene", "Subject", "caption",
    "caption_variant",
    "render_pose_mask", "render_scene", "sample_offsets", "sample_scene", "scene_combos",
    "subject_bbox",
]
