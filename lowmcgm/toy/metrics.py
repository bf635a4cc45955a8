"""Reading a toy-world image back: background class, foreground, subject kind, pose shape, IoU.

Works on rendered scenes and on images a model generated, by nearest-colour lookups against the
palettes in ``scenes.py`` (chosen far apart in RGB, so no learned classifier is needed):

- background: the palette whose sky and ground colours are nearest to the median colours of the
  top and bottom bands of the image;
- foreground: pixels far from every colour of that background, and from the shades the image
  itself gives its sky and ground (the median colours of those bands, when no subject colour is
  near them: a generated sky is often a shade off the palette);
- kind: the kind whose colours are nearest to most foreground pixels;
- pose: the height/width of the bounding box of the largest foreground blob;
- drawn: a kind's colours form one blob holding most of them, in an image that is not noise.

This module owns the measurements; what the benchmark does with them is ``tools/``' business.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lowmcgm.toy.scenes import BACKDROPS, BACKGROUNDS, DISTINCTIVE_ROLES, FAR_SHADE, PALETTES
from lowmcgm.toy.silhouettes import KINDS

NO_SUBJECT = "none"
# Share of the image height read as sky (top) and ground (bottom): the horizon is drawn between
# 35% and 55% of the height, so these bands never cross it.
BAND_FRACTION = 0.12
# RGB distance beyond which a pixel is not background: the background texture moves colours by
# under 15 units, the nearest subject colour sits 60 units away.
FOREGROUND_DISTANCE = 38.0
# A band's median colour counts as a background shade only this far from every subject colour: as far
# as the palette's own background colours are (street's ground, the nearest, lies 60 units from the
# dog's shaded main colour), so a band that a subject fills is never taken for background. The bundled
# toy model drew a beach sky at (123, 160, 194): 55 units from the palette's, 100 from any subject's.
MIN_SHADE_SUBJECT_DISTANCE = 60.0
# A foreground pixel is assigned to a kind only if some kind colour lies this close.
KIND_DISTANCE = 70.0
# Fewer foreground pixels than this share of the image means no subject was drawn.
MIN_SUBJECT_FRACTION = 0.004
# Noise: foreground that no subject colour explains (no kind colour within KIND_DISTANCE). A rendered
# scene has none (the dark detail colour lies 45 units from the dog's shaded second); uniform RGB
# noise leaves about half of the image so (0.54), noise smoothed over 8 px 0.395 (both as
# tests/test_toy_world.py draws them).
MAX_UNEXPLAINED_FRACTION = 0.2
# Rendered scenes keep at most about a quarter of the image in front of the background; the bundled
# toy model draws subjects too large, over up to about half of it (docs/benchmarks.md, "The drawn
# rule"). An image with almost no background left is a colour wash, whatever its colours.
MAX_FOREGROUND_FRACTION = 0.8
# A kind counts as drawn when its largest blob holds this share of its pixels, not specks of its
# colours spread over the image.
MIN_BLOB_SHARE = 0.5


def _as_float(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    return image.astype(np.float32)


def _band_medians(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median colours of the top and bottom bands of a float (H, W, 3) image."""
    band = max(1, int(round(img.shape[0] * BAND_FRACTION)))
    # Medians ignore the subjects and details that reach into a band.
    return np.median(img[:band].reshape(-1, 3), axis=0), np.median(img[-band:].reshape(-1, 3), axis=0)


def classify_background(image: np.ndarray) -> str:
    """The background class of an image of the toy world.

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        One of ``BACKGROUNDS``.
    """
    top, bottom = _band_medians(_as_float(image))
    cost = [np.linalg.norm(top - BACKDROPS[b].top) + np.linalg.norm(bottom - BACKDROPS[b].bottom)
            for b in BACKGROUNDS]
    return BACKGROUNDS[int(np.argmin(cost))]


def background_colours(image: np.ndarray, background: str) -> np.ndarray:
    """The colours of ``background`` as this image draws them: the palette's, and the median colours
    of its top and bottom bands that lie at least ``MIN_SHADE_SUBJECT_DISTANCE`` from every subject
    colour (a generated sky or ground a shade off the palette).

    Args:
        image: (H, W, 3) uint8 RGB.
        background: one of ``BACKGROUNDS``.

    Returns:
        (C, 3) float32, the palette's colours first.
    """
    palette = np.asarray(BACKDROPS[background].colours, np.float32)  # (C, 3)
    subject_colours, _ = _kind_colours()
    shades = [m for m in _band_medians(_as_float(image))
              if np.linalg.norm(subject_colours - m, axis=-1).min() >= MIN_SHADE_SUBJECT_DISTANCE]
    return np.concatenate([palette, np.asarray(shades, np.float32).reshape(-1, 3)])


def foreground_mask(image: np.ndarray, background: str,
                    distance: float = FOREGROUND_DISTANCE) -> np.ndarray:
    """Pixels that belong to no colour of ``background`` (``background_colours``: the palette's and
    the image's own shades of its sky and ground).

    Args:
        image: (H, W, 3) uint8 RGB.
        background: one of ``BACKGROUNDS`` (usually ``classify_background(image)``).
        distance: RGB distance from every background colour beyond which a pixel is foreground.

    Returns:
        (H, W) bool.
    """
    img = _as_float(image)
    colours = background_colours(image, background)  # (C, 3)
    nearest = np.min(np.linalg.norm(img[:, :, None, :] - colours[None, None], axis=-1), axis=-1)
    return nearest > distance


def _kind_colours() -> tuple[np.ndarray, np.ndarray]:
    colours, owners = [], []
    for k, kind in enumerate(KINDS):
        for role in DISTINCTIVE_ROLES:
            base = np.asarray(PALETTES[kind][role - 1], np.float32)
            colours += [base, base * FAR_SHADE]  # far-side limbs are drawn shaded
            owners += [k, k]
    return np.stack(colours), np.asarray(owners)


def kind_labels(image: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Per-pixel kind index into ``KINDS`` for foreground pixels, -1 elsewhere or if no colour fits.

    Args:
        image: (H, W, 3) uint8 RGB.
        fg: (H, W) bool foreground.

    Returns:
        (H, W) int array.
    """
    img = _as_float(image)
    colours, owners = _kind_colours()
    dist = np.linalg.norm(img[:, :, None, :] - colours[None, None], axis=-1)  # (H, W, C)
    labels = owners[np.argmin(dist, axis=-1)]
    labels[(np.min(dist, axis=-1) > KIND_DISTANCE) | ~fg] = -1
    return labels


def classify_kind(image: np.ndarray, fg: np.ndarray) -> str:
    """The kind most foreground pixels look like, or ``NO_SUBJECT`` when too few are foreground.

    Args:
        image: (H, W, 3) uint8 RGB.
        fg: (H, W) bool foreground (``foreground_mask``).

    Returns:
        One of ``KINDS`` or ``NO_SUBJECT``.
    """
    if not subject_present(fg):
        return NO_SUBJECT
    labels = kind_labels(image, fg)
    counts = np.bincount(labels[labels >= 0], minlength=len(KINDS))
    if counts.sum() == 0:
        return NO_SUBJECT
    return KINDS[int(np.argmax(counts))]


def kind_mask(image: np.ndarray, fg: np.ndarray, kind: str) -> np.ndarray:
    """The silhouette of ``kind``: foreground pixels nearest to its colours, holes closed.

    The dark detail colour (eyes, noses, hair) belongs to no kind, so small holes are filled.
    """
    labels = kind_labels(image, fg)
    mask = labels == KINDS.index(kind)
    return ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=1) & fg | mask


def subject_present(fg: np.ndarray, min_fraction: float = MIN_SUBJECT_FRACTION) -> bool:
    """Whether enough pixels are foreground for a subject to be there."""
    return bool(fg.mean() >= min_fraction)


def looks_like_noise(image: np.ndarray, fg: np.ndarray) -> bool:
    """Whether the image is noise or a colour wash rather than subjects on a background.

    Args:
        image: (H, W, 3) uint8 RGB.
        fg: (H, W) bool foreground (``foreground_mask``).
    """
    unexplained = fg & (kind_labels(image, fg) < 0)
    return bool(unexplained.mean() > MAX_UNEXPLAINED_FRACTION or fg.mean() > MAX_FOREGROUND_FRACTION)


def subject_drawn(image: np.ndarray, fg: np.ndarray, silhouette: np.ndarray) -> bool:
    """Whether a kind's silhouette reads as a drawn subject.

    Drawn: the image is not noise (``looks_like_noise``), and the silhouette's largest blob is big
    enough for a subject (``subject_present``) and holds ``MIN_BLOB_SHARE`` of its pixels.

    Args:
        image: (H, W, 3) uint8 RGB.
        fg: (H, W) bool foreground (``foreground_mask``).
        silhouette: (H, W) bool, the kind's pixels (``kind_mask``).
    """
    blob = largest_component(silhouette)
    return bool(not looks_like_noise(image, fg) and subject_present(blob)
                and blob.sum() >= MIN_BLOB_SHARE * silhouette.sum())


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected blob of ``mask`` (all False if it is empty)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def pose_ratio(fg: np.ndarray) -> float:
    """Height / width of the bounding box of the largest foreground blob (NaN if none).

    Lying subjects are wide (0.3-0.45), sitting ones compact (0.85-1.1), standing people tall.
    """
    blob = largest_component(fg)
    if not blob.any():
        return float("nan")
    rows = np.nonzero(blob.any(axis=1))[0]
    cols = np.nonzero(blob.any(axis=0))[0]
    return float((rows[-1] - rows[0] + 1) / (cols[-1] - cols[0] + 1))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 if both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)
