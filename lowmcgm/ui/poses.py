"""A pose library: one mask per toy-world kind and pose, for a pose without painting one.

The masks are the toy world's own silhouettes (``toy.silhouettes``), a subject standing in the middle
of the picture; on a real model they are still useful rough shapes (a sitting or lying outline).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from lowmcgm.toy.silhouettes import KINDS, POSES, render_pose_mask

LIBRARY_PX = 128


def pose_names() -> list[str]:
    """``"dog sitting"``, ``"dog standing"``, ...: every kind in every pose."""
    return [f"{kind} {pose}" for kind in KINDS for pose in POSES]


@lru_cache(maxsize=None)
def pose_mask(name: str) -> np.ndarray:
    """The mask of ``name`` (one of ``pose_names()``), (LIBRARY_PX, LIBRARY_PX) bool."""
    kind, _, pose = name.partition(" ")
    if kind not in KINDS or pose not in POSES:
        raise KeyError(name)
    return render_pose_mask(kind, pose, LIBRARY_PX, x=0.5, y=0.8, scale=0.55)
