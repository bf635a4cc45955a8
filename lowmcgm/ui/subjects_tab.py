"""Tab 1, photo and subjects: the photo on each subject's canvas, each subject's mask (painted, or
an uploaded file checked as the CLI checks it), and the masks over the photo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lowmcgm.errors import UserError
from lowmcgm.ui import require_gradio
from lowmcgm.ui.editor import SUBJECT_COLOURS, editor_value, fit_mask, overlay, painted_mask
from lowmcgm.ui.page_state import MAX_SUBJECTS, error_text, photo_array, shown
from lowmcgm.ui.workspace import Subject, overlap_warnings

# A brush a 24th of the photo's short side: a subject's outline in a few strokes, its edge still precise.
BRUSH_FRACTION = 24


def brush(subject: int, size: int):
    """Subject ``subject``'s brush: its own colour (to tell canvases apart), ``size`` pixels wide."""
    gr = require_gradio()
    return gr.Brush(default_size=size, colors=["#%02x%02x%02x" % SUBJECT_COLOURS[subject]], color_mode="fixed")


def on_photo(path: str | None):
    """Show an uploaded photo on every subject's canvas, or say why it cannot be used.

    Returns the photo box's value (a refused file is taken out, so another can be uploaded), the
    message and the canvases.
    """
    if not path:  # cleared by the user (a refused file, taken out here, fires no clear): nothing to say
        return [None, "", *[None] * MAX_SUBJECTS]
    try:
        photo = photo_array(path)
    except UserError as exc:
        return [None, error_text(exc, [path]), *[None] * MAX_SUBJECTS]
    h, w = photo.shape[:2]
    # The brush is sized to the photo (gradio's "auto" is a fixed 25 px); the editor can change it.
    size = max(2, round(min(h, w) / BRUSH_FRACTION))
    gr = require_gradio()
    editors = [gr.update(value=editor_value(photo, colour=SUBJECT_COLOURS[i]), brush=brush(i, size))
               for i in range(MAX_SUBJECTS)]
    return [gr.update(), shown(f"Photo {Path(path).name}: {w} x {h} px. Paint each subject on its canvas (or upload "
            "its mask)."), *editors]


def on_mask_upload(subject: int, photo: str | None, path: str | None) -> str:
    """The photo tab's message for subject ``subject``'s mask file, uploaded or taken out.

    An upload gets the CLI's checks against the photo at once (``uploaded_mask``), so a message
    about an earlier file never outlives it.
    """
    if not path:
        return shown(f"Subject {subject + 1}: no mask file, its painting is used.")
    try:
        mask = uploaded_mask(path, photo_array(photo).shape[:2] if photo else None)
    except UserError as exc:
        return error_text(exc, [photo, path])
    h, w = mask.shape
    checked = "" if photo else "; upload the photo to check its size"
    return shown(f"Subject {subject + 1}: mask {Path(path).name} ({w} x {h} px) is used instead of its painting"
                 f"{checked}.")


def uploaded_mask(path: str, photo_hw: tuple[int, int] | None) -> np.ndarray:
    """An uploaded mask file as (H, W) bool, with the CLI's checks (``data.check_masks``) once the
    photo's (height, width) is known."""
    from lowmcgm.data import check_masks, load_mask

    mask = load_mask(path) > 0.5
    if photo_hw is not None:
        check_masks([mask], [path], photo_hw[::-1])
    return mask


def subject_masks(photo: str | None, count: int, editors: list[Any], uploads: list[str | None]) -> list[np.ndarray]:
    """Each subject's mask at the photo's size: an uploaded mask file wins over painting.

    Uploaded masks get the CLI's checks (``data.check_masks``), with the CLI's messages.
    """
    if not photo:
        raise UserError("No photo: upload one first.")
    h, w = photo_array(photo).shape[:2]
    masks = []
    for i in range(count):
        if uploads[i]:
            mask = uploaded_mask(uploads[i], (h, w))
        else:
            mask = painted_mask(editors[i])
            if mask is None:
                raise UserError(f"Subject {i + 1} has no mask: paint it over the photo, or upload a mask file.")
            mask = fit_mask(mask, h, w)
        masks.append(mask)
    return masks


def on_show_masks(photo, count, *rest):
    """The masks over the photo, and the message: how many are ready, with a warning per overlap.

    ``rest``: per subject slot the canvas, then per slot the mask upload, then per slot the handle.
    """
    editors, uploads, handles = rest[:MAX_SUBJECTS], rest[MAX_SUBJECTS:2 * MAX_SUBJECTS], rest[2 * MAX_SUBJECTS:]
    try:
        masks = subject_masks(photo, int(count), list(editors), list(uploads))
    except UserError as exc:
        return error_text(exc, [photo, *uploads]), None
    subjects = tuple(Subject(handle_of(handles, i), "", mask) for i, mask in enumerate(masks))
    message = " ".join([f"{len(masks)} subject mask(s) ready.", *overlap_warnings(subjects)])
    return shown(message), overlay(photo_array(photo), masks)


def handle_of(handles, i: int) -> str:
    """Subject ``i``'s handle as typed, or its default when the box is empty."""
    return handles[i] or f"<asset{i}>"
