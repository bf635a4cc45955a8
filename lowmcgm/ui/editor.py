"""Drawing canvases (gradio's ImageEditor values) to and from masks, and masks shown over a photo.

An editor value is a dict with ``background`` (the photo, or a blank sheet for a pose), ``layers``
(what was painted, RGBA) and ``composite``. A painted pixel is one whose alpha in any layer is not
zero, whatever the brush colour: the page offers one colour per subject only to tell them apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

# One tint per subject over the photo, the order of the handles (matches the brush colours).
SUBJECT_COLOURS = ((230, 60, 60), (40, 120, 230), (40, 170, 80), (230, 160, 30))
# Pose canvases start as a white sheet of this side (a pose mask is resized to the image anyway).
BLANK_SIDE = 256


def painted_mask(value: dict[str, Any] | None) -> np.ndarray | None:
    """The pixels painted in an editor value, as (H, W) bool; None when nothing is painted."""
    if not value:
        return None
    painted = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = np.asarray(layer)
        alpha = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[-1] == 4 else layer.reshape(
            layer.shape[:2] + (-1,)).max(-1) > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return None
    return painted


def pose_on_canvas(value: dict[str, Any] | None) -> np.ndarray | None:
    """A pose canvas's mask: the strokes painted on it, plus any dark pixels of its sheet (a pose
    from the library, or a black-on-white pose image, is drawn as the sheet itself); None if empty."""
    painted = painted_mask(value)
    background = None if not value else value.get("background")
    if background is not None:
        sheet = np.asarray(background)
        dark = sheet[..., :3].astype(np.float32).mean(-1) < 128
        if sheet.shape[-1] == 4:
            dark &= sheet[..., 3] > 0
        if dark.any():
            painted = dark if painted is None else painted | fit_mask(dark, *painted.shape)
    return painted


def sheet_with(mask: np.ndarray, side: int = BLANK_SIDE) -> np.ndarray:
    """A white sheet with ``mask`` drawn in black: how the page shows a pose from the library."""
    sheet = blank_sheet(side)
    sheet[fit_mask(mask, side, side)] = 0
    return sheet


def blank_sheet(side: int = BLANK_SIDE) -> np.ndarray:
    """A white RGB canvas for drawing a pose on."""
    return np.full((side, side, 3), 255, np.uint8)


def editor_value(background: np.ndarray, mask: np.ndarray | None = None,
                 colour: tuple[int, int, int] = SUBJECT_COLOURS[0]) -> dict[str, Any]:
    """An editor value showing ``background`` with ``mask`` as a painted layer (or nothing painted)."""
    h, w = background.shape[:2]
    layer = np.zeros((h, w, 4), np.uint8)
    if mask is not None:
        mask = fit_mask(mask, h, w)
        layer[mask] = (*colour, 255)
    return {"background": background, "layers": [layer], "composite": None}


def fit_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A bool mask resized (nearest) to ``height`` x ``width``."""
    if mask.shape[:2] == (height, width):
        return mask.astype(bool)
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(img) > 127


def overlay(photo: np.ndarray, masks: list[np.ndarray | None], alpha: float = 0.5) -> np.ndarray:
    """The photo with each subject's mask tinted in its colour (RGB uint8)."""
    out = np.asarray(photo)[..., :3].astype(np.float32).copy()
    h, w = out.shape[:2]
    for i, mask in enumerate(masks):
        if mask is None:
            continue
        m = fit_mask(mask, h, w)
        colour = np.asarray(SUBJECT_COLOURS[i % len(SUBJECT_COLOURS)], np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * colour
    return out.round().astype(np.uint8)
