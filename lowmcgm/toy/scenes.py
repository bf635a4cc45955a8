"""Procedural toy scenes: backgrounds, colours, rendering, sampling and captions (numpy + PIL).

A scene is 1-3 articulated subjects ("dog", "cat", "bird", "person") on a two-tone background
("beach", "grass", "snow", "room", "street"). The subjects' geometry (poses, shapes, placement,
drawing a silhouette) is ``silhouettes.py``'s; this module colours them from their palettes, draws
them over a background, samples scenes and writes their captions.

Reading an image back (background class, subject kind, silhouette) is ``metrics.py``'s job; it uses
the palettes defined here, which are chosen far apart in RGB so that segmentation is a
nearest-colour lookup.

Example::

    rng = np.random.default_rng(0)
    scene = sample_scene(rng, n_subjects=2)
    image, masks = render_scene(scene, size_px=64)   # (64, 64, 3) uint8, [(64, 64) bool] * 2
    text = caption(scene)          # "a photo of a dog running on the beach and a ..."
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from lowmcgm.runs.write_guard import replacing
from lowmcgm.toy.silhouettes import (FAR_ROLE_OFFSET, KINDS, POSES, ROLE_ACCENT, ROLE_MAIN, ROLE_SECOND, Subject,
                                     render_role_map, sample_offsets, subject_bbox)

Colour = tuple[int, int, int]

BACKGROUNDS = ("beach", "grass", "snow", "room", "street")

# (kind, pose, background) triples that sample_scene leaves out when asked to: the pose benchmark
# photographs these, so the base model never saw them captioned. One or two per kind; the bundled
# example (a dog standing and a cat lying on grass) is made of two of them.
HELDOUT_COMBOS = (
    ("dog", "standing", "grass"), ("cat", "lying", "grass"), ("bird", "standing", "snow"),
    ("person", "standing", "street"), ("dog", "lying", "beach"), ("cat", "sitting", "room"),
)


@dataclass(frozen=True)
class Backdrop:
    """A background's colours: ``top`` above the horizon, ``bottom`` below, ``extras``."""

    top: Colour
    bottom: Colour
    extras: tuple[Colour, ...]
    preposition: str

    @property
    def colours(self) -> tuple[Colour, ...]:
        return (self.top, self.bottom) + self.extras


# Backgrounds and subjects use disjoint parts of colour space (every subject colour is >= 60 RGB
# units from every background colour; tests check it), so segmentation needs no learning.
BACKDROPS = {
    "beach": Backdrop(top=(120, 190, 240), bottom=(238, 216, 160), extras=((40, 110, 180),),
                      preposition="on"),
    "grass": Backdrop(top=(190, 228, 250), bottom=(76, 156, 62), extras=((58, 130, 48),),
                      preposition="on"),
    "snow": Backdrop(top=(200, 208, 222), bottom=(250, 250, 252), extras=((226, 232, 246),),
                     preposition="in"),
    "room": Backdrop(top=(214, 200, 228), bottom=(112, 126, 160), extras=((96, 108, 142),),
                     preposition="in"),
    "street": Backdrop(top=(150, 146, 140), bottom=(78, 78, 84), extras=((108, 112, 128),
                                                                       (222, 222, 214)),
                       preposition="on"),
}

# Darkening of the far-side limbs (roles + FAR_ROLE_OFFSET).
FAR_SHADE = 0.8

# Per kind: main, second, accent, detail colours. Detail (eyes, nose, hair) is shared-dark and is
# not used to tell kinds apart.
PALETTES: dict[str, tuple[Colour, Colour, Colour, Colour]] = {
    "dog": ((140, 85, 45), (82, 48, 26), (82, 48, 26), (25, 20, 20)),
    "cat": ((245, 150, 45), (200, 100, 20), (245, 150, 45), (25, 20, 20)),
    "bird": ((215, 40, 50), (145, 20, 45), (250, 200, 40), (25, 20, 20)),
    "person": ((130, 60, 190), (35, 45, 110), (200, 130, 95), (45, 30, 25)),
}
# Roles whose colours identify the kind (the detail colour is common to all).
DISTINCTIVE_ROLES = (ROLE_MAIN, ROLE_SECOND, ROLE_ACCENT)

_WORDS_FIXED = ("a", "photo", "of", "and", "the")
VOCABULARY: list[str] = sorted(
    set(_WORDS_FIXED) | set(KINDS) | set(POSES) | set(BACKGROUNDS)
    | {b.preposition for b in BACKDROPS.values()}
)


@dataclass
class Scene:
    """A background, a horizon height (fraction of image height) and subjects in caption order."""

    background: str
    subjects: list[Subject]
    horizon: float = 0.45
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Rendering.

def _smooth_noise(rng: np.random.Generator, size_px: int, grid: int,
                  amplitude: float) -> np.ndarray:
    # Drawn on a fixed coarse grid and upsampled, so every resolution shows the same texture.
    coarse = rng.uniform(-amplitude, amplitude, (grid, grid)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size_px, size_px), Image.BILINEAR))


def _render_background(scene: Scene, size_px: int, rng: np.random.Generator) -> np.ndarray:
    drop = BACKDROPS[scene.background]
    img = np.empty((size_px, size_px, 3), np.float32)
    horizon = int(round(scene.horizon * size_px))
    img[:horizon] = drop.top
    img[horizon:] = drop.bottom
    canvas = Image.fromarray(img.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    s, h = size_px, scene.horizon * size_px
    if scene.background == "beach":  # sea between sky and sand
        draw.rectangle([0, h - 0.08 * s, s, h - 0.5], fill=drop.extras[0])
    elif scene.background == "grass":  # tufts
        for _ in range(14):
            x, y = rng.uniform(0, 1) * s, rng.uniform(h + 0.03 * s, s)
            draw.line([(x, y), (x + rng.uniform(-0.02, 0.02) * s, y - 0.05 * s)],
                      fill=drop.extras[0], width=max(1, s // 64))
    elif scene.background == "snow":  # bluish drifts
        for _ in range(3):
            x, y = rng.uniform(0, 1) * s, rng.uniform(h + 0.05 * s, s)
            draw.ellipse([x - 0.15 * s, y - 0.03 * s, x + 0.15 * s, y + 0.03 * s],
                         fill=drop.extras[0])
    elif scene.background == "room":  # floor planks
        for k in range(1, 5):
            y = h + (s - h) * (k / 5) ** 1.3
            draw.line([(0, y), (s, y)], fill=drop.extras[0], width=max(1, s // 64))
    else:  # street: windows on the facade, dashed lane line on the asphalt
        for _ in range(5):
            x, y = rng.uniform(0.05, 0.9) * s, rng.uniform(0.12, 0.7) * h
            draw.rectangle([x, y, x + 0.07 * s, y + 0.09 * s], fill=drop.extras[0])
        y = h + (s - h) * rng.uniform(0.3, 0.6)
        for x in np.arange(rng.uniform(0, 0.15), 1, 0.25) * s:
            draw.rectangle([x, y, x + 0.12 * s, y + 0.025 * s], fill=drop.extras[1])
    img = np.asarray(canvas).astype(np.float32)
    img += _smooth_noise(rng, size_px, 6, 6.0)[..., None]
    img += rng.uniform(-3, 3, img.shape).astype(np.float32)
    return img


def render_scene(scene: Scene, size_px: int = 64) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw a scene.

    Args:
        scene: what to draw.
        size_px: side of the square image.

    Returns:
        ``(image, masks)``: image (size_px, size_px, 3) uint8; masks, one (size_px, size_px) bool
        array per subject in ``scene.subjects`` order, marking the pixels where that subject is
        visible (nearer subjects, those with a lower ground line, hide farther ones).
    """
    rng = np.random.default_rng(scene.seed)
    img = _render_background(scene, size_px, rng)
    owner = np.full((size_px, size_px), -1, np.int32)
    # Farther subjects (ground line higher up) first, so nearer ones cover them.
    for index in sorted(range(len(scene.subjects)), key=lambda i: scene.subjects[i].y):
        subject = scene.subjects[index]
        roles = render_role_map(subject, size_px)
        srng = np.random.default_rng(subject.texture_seed + 1)
        table = np.zeros((2 * FAR_ROLE_OFFSET + 1, 3), np.float32)
        for role, colour in enumerate(PALETTES[subject.kind], start=1):
            table[role] = colour
            table[role + FAR_ROLE_OFFSET] = np.asarray(colour, np.float32) * FAR_SHADE
        inside = roles > 0
        colours = table[roles] + srng.uniform(-5, 5, (size_px, size_px, 3)).astype(np.float32)
        img[inside] = colours[inside]
        owner[inside] = index
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    masks = [owner == i for i in range(len(scene.subjects))]
    return image, masks


# ---------------------------------------------------------------------------------------------
# Sampling and captions.

_SCALE_RANGE = {1: (0.4, 0.56), 2: (0.3, 0.42), 3: (0.24, 0.33)}
_MAX_OVERLAP = 0.25  # bounding-box intersection over the smaller box


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, n_subjects: int | None = None,
                 kinds: tuple[str, ...] | list[str] | None = None,
                 poses: tuple[str, ...] | list[str] | None = None,
                 backgrounds: tuple[str, ...] | list[str] | None = None,
                 exclude: tuple[tuple[str, str, str], ...] | None = None,
                 jitter_deg: float = 8.0) -> Scene:
    """Draw a random scene; the same generator state gives the same scene.

    Args:
        rng: numpy generator; it is advanced.
        n_subjects: 1-3, or None for 1 (40%), 2 (35%) or 3 (25%).
        kinds, poses, backgrounds: restrict the choices (default: all).
        exclude: (kind, pose, background) triples no subject may form, e.g. ``HELDOUT_COMBOS``.
        jitter_deg: spread of the joint-angle jitter.

    Returns:
        A ``Scene`` whose subjects fit inside the image and overlap little.

    Raises:
        ValueError: if the restrictions leave no allowed (kind, pose) for the background.
    """
    kinds, poses = tuple(kinds or KINDS), tuple(poses or POSES)
    background = _pick(rng, tuple(backgrounds or BACKGROUNDS))
    if n_subjects is None:
        n_subjects = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    if not 1 <= n_subjects <= 3:
        raise ValueError(f"n_subjects must be 1-3, got {n_subjects}")
    banned = set(exclude or ())
    allowed = [(k, p) for k in kinds for p in poses if (k, p, background) not in banned]
    if not allowed:
        raise ValueError(f"no (kind, pose) left for background {background!r}")
    horizon = float(rng.uniform(0.35, 0.55))
    lo, hi = _SCALE_RANGE[n_subjects]
    subjects: list[Subject] = []
    boxes: list[tuple[float, float, float, float]] = []
    while len(subjects) < n_subjects:
        kind, pose = allowed[int(rng.integers(len(allowed)))]
        subject = Subject(kind, pose, scale=float(rng.uniform(lo, hi)),
                          flip=bool(rng.random() < 0.5),
                          offsets=sample_offsets(rng, kind, pose, jitter_deg),
                          texture_seed=int(rng.integers(2**31)))
        for _ in range(30):
            subject = _place(rng, subject, horizon)
            box = subject_bbox(subject)
            if all(_overlap(box, other) <= _MAX_OVERLAP for other in boxes):
                break
            subject.scale *= 0.93  # crowded: shrink a little and try elsewhere
        subjects.append(subject)
        boxes.append(box)
    return Scene(background, subjects, horizon=horizon, seed=int(rng.integers(2**31)))


def _place(rng: np.random.Generator, subject: Subject, horizon: float) -> Subject:
    """Pick x, y so that the subject stands below the horizon and fits in the image."""
    for _ in range(20):
        x0, y0, x1, y1 = subject_bbox(replace(subject, x=0.0, y=0.0))
        width, top = x1 - x0, -y0  # height above the ground line, lift included
        y_lo, y_hi = max(horizon + 0.1, top + 0.02), 0.97
        if width < 0.94 and y_lo < y_hi:
            x = float(rng.uniform(0.03 + width / 2, 0.97 - width / 2))
            return replace(subject, x=x, y=float(rng.uniform(y_lo, y_hi)))
        subject = replace(subject, scale=subject.scale * 0.9)
    return replace(subject, x=0.5, y=0.97)


PLACES = ("first", "end", None)


def caption(scene: Scene, pose_words: bool = True, place: str | None = "first") -> str:
    """The scene's caption, e.g. "a photo of a dog running on the beach and a cat sitting".

    Args:
        pose_words: name each subject's pose ("a dog running") or only its kind ("a dog").
        place: where the background goes: after the first subject ("first", the canonical
            caption), after all of them ("end": "a photo of a dog and a cat in the snow", the way
            lowmcgm's own prompts read), or nowhere (None: "a photo of a dog").
    """
    if place not in PLACES:
        raise ValueError(f"place must be one of {PLACES}, got {place!r}")
    where = f"{BACKDROPS[scene.background].preposition} the {scene.background}"
    if not scene.subjects:
        return f"a photo of the {scene.background}"
    parts = [f"a {s.kind} {s.pose}" if pose_words else f"a {s.kind}" for s in scene.subjects]
    if place == "first":
        parts[0] += f" {where}"
    text = "a photo of " + " and ".join(parts)
    return f"{text} {where}" if place == "end" else text


# How often each wording is drawn for training (caption_variant). Pose words are left out half the
# time because lowmcgm's prompts name a handle and a place, not a pose; a caption without a place
# ("a photo of a dog") is the class prompt of prior preservation.
POSE_WORD_RATE = 0.5
PLACE_RATES = {"first": 0.4, "end": 0.45, None: 0.15}


def caption_variant(scene: Scene, rng: np.random.Generator) -> str:
    """A caption of ``scene`` in a wording drawn from ``rng`` (see ``POSE_WORD_RATE``)."""
    pose_words = bool(rng.random() < POSE_WORD_RATE)
    places = list(PLACE_RATES)
    place = places[int(rng.choice(len(places), p=list(PLACE_RATES.values())))]
    return caption(scene, pose_words=pose_words, place=place)


def scene_combos(scene: Scene) -> set[tuple[str, str, str]]:
    """The (kind, pose, background) triples a scene shows."""
    return {(s.kind, s.pose, scene.background) for s in scene.subjects}


def handle_prompt(handles: list[str], background: str) -> str:
    """``a photo of <asset0> and <asset1> in the snow``: the captions' wording, handles for subjects."""
    return f"a photo of {' and '.join(handles)} {BACKDROPS[background].preposition} the {background}"


def save_mask(mask: np.ndarray, path) -> str:
    """Write a (H, W) bool mask as an 8-bit white-on-black PNG (how lowmcgm reads masks); return the path."""
    with replacing(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG", optimize=True)
    return str(path)
