"""Procedural toy scenes: subjects, poses, backgrounds, masks and captions (numpy + PIL only).

A scene is 1-3 articulated subjects ("dog", "cat", "bird", "person") on a two-tone background
("beach", "grass", "snow", "room", "street"). Each subject is a silhouette of body, head and limbs
whose joint angles come from its pose ("sitting", "standing", "running", "lying", "jumping") plus a
continuous jitter, so poses vary smoothly and still differ visibly (lying is wide, sitting is
compact and tall). Everything is drawn at the requested resolution from geometry kept in image
fractions, so a 256 px render is a sharper copy of the 64 px one; limbs are at least
``MIN_LIMB_FRACTION`` of the image wide (3.2 px at 64 px) so a 2x or 4x VAE keeps them.

This module owns geometry, palettes, sampling, rendering and captions. Reading an image back
(background class, subject kind, silhouette) is ``metrics.py``'s job; it uses the palettes defined
here, which are chosen far apart in RGB so that segmentation is a nearest-colour lookup.

Example::

    rng = np.random.default_rng(0)
    scene = sample_scene(rng, n_subjects=2)
    image, masks = render_scene(scene, size_px=64)   # (64, 64, 3) uint8, [(64, 64) bool] * 2
    text = caption(scene)          # "a photo of a dog running on the beach and a ..."
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

Colour = tuple[int, int, int]

KINDS = ("dog", "cat", "bird", "person")
POSES = ("sitting", "standing", "running", "lying", "jumping")
BACKGROUNDS = ("beach", "grass", "snow", "room", "street")

# (kind, pose, background) triples that sample_scene leaves out when asked to: the pose benchmark
# photographs these, so the base model never saw them captioned. One or two per kind; the bundled
# example (a dog standing and a cat lying on grass) is made of two of them.
HELDOUT_COMBOS = (
    ("dog", "standing", "grass"), ("cat", "lying", "grass"), ("bird", "standing", "snow"),
    ("person", "standing", "street"), ("dog", "lying", "beach"), ("cat", "sitting", "room"),
)

# Thinnest limb, as a fraction of the image side: 3.2 px at 64 px, so a 4x VAE still sees it.
MIN_LIMB_FRACTION = 3.2 / 64
# Thinnest texture stroke (cat stripes): thinner than limbs, still a pixel and a half at 64 px.
MIN_STROKE_FRACTION = 1.6 / 64


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

# Subject roles: index into a subject's palette; +_FAR marks the far-side limbs, drawn darker.
ROLE_MAIN, ROLE_SECOND, ROLE_ACCENT, ROLE_DETAIL = 1, 2, 3, 4
_FAR = 4
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

# Subject size relative to Subject.scale: a bird is small, a person tall.
_KIND_SIZE = {"dog": 1.0, "cat": 0.9, "bird": 0.8, "person": 0.8}

_WORDS_FIXED = ("a", "photo", "of", "and", "the")
VOCABULARY: list[str] = sorted(
    set(_WORDS_FIXED) | set(KINDS) | set(POSES) | set(BACKGROUNDS)
    | {b.preposition for b in BACKDROPS.values()}
)


@dataclass
class Subject:
    """One subject of a scene.

    Attributes:
        kind: one of ``KINDS``.
        pose: one of ``POSES``.
        x: horizontal centre of the subject's bounding box, as a fraction of the image width.
        y: ground line under the subject (feet, or where a jumper would land), fraction of height.
        scale: body size as a fraction of the image side (about the length of a dog's body).
        flip: facing left instead of right.
        offsets: jitter added to the pose's joint angles (degrees) and lift, by parameter name;
            empty gives the canonical pose.
        texture_seed: seeds the coat pattern (spots, stripe phase) and pixel noise.
    """

    kind: str
    pose: str
    x: float = 0.5
    y: float = 0.85
    scale: float = 0.45
    flip: bool = False
    offsets: dict[str, float] = field(default_factory=dict)
    texture_seed: int = 0


@dataclass
class Scene:
    """A background, a horizon height (fraction of image height) and subjects in caption order."""

    background: str
    subjects: list[Subject]
    horizon: float = 0.45
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# Geometry. Local frame: unit = Subject.scale * kind size, x points where the subject faces,
# y points up. Angles of limbs are measured from straight down, positive towards the front.

@dataclass(frozen=True)
class _Shape:
    kind: str  # "ellipse" (cx, cy, rx, ry, rot_deg) | "capsule" (x0, y0, x1, y1, w) | "poly"
    role: int
    data: tuple
    texture: bool = False  # painted only over the subject's main-colour pixels


def _dir(angle_deg: float) -> tuple[float, float]:
    a = math.radians(angle_deg)
    return math.sin(a), -math.cos(a)


def _rot(u: float, v: float, deg: float) -> tuple[float, float]:
    a = math.radians(deg)
    return u * math.cos(a) - v * math.sin(a), u * math.sin(a) + v * math.cos(a)


def _at(p: tuple[float, float], angle: float, length: float) -> tuple[float, float]:
    d = _dir(angle)
    return p[0] + length * d[0], p[1] + length * d[1]


def _limb(base, a_upper, a_lower, l_upper, l_lower, width, role) -> list[_Shape]:
    knee = _at(base, a_upper, l_upper)
    foot = _at(knee, a_lower, l_lower)
    return [_Shape("capsule", role, (*base, *knee, width)),
            _Shape("capsule", role, (*knee, *foot, width))]


def _ellipse(c, rx, ry, rot, role, texture=False) -> _Shape:
    return _Shape("ellipse", role, (c[0], c[1], rx, ry, rot), texture)


# Canonical poses. Quadruped keys: body tilt (front up), legs as (upper, lower) world angles for
# front/hind near/far, neck and tail angles, lift (jump height). Values are degrees or units.
_QUAD_POSES = {
    "standing": dict(tilt=0, fn_u=8, fn_l=2, ff_u=-6, ff_l=-4, hn_u=-8, hn_l=2, hf_u=6, hf_l=4,
                     neck=140, tail=-130, lift=0.0),
    "sitting": dict(tilt=42, fn_u=6, fn_l=2, ff_u=-4, ff_l=-2, hn_u=85, hn_l=-95, hf_u=80,
                    hf_l=-90, neck=170, tail=-90, lift=0.0),
    "running": dict(tilt=0, fn_u=60, fn_l=80, ff_u=35, ff_l=15, hn_u=-55, hn_l=-80, hf_u=-30,
                    hf_l=-10, neck=115, tail=-105, lift=0.06),
    "lying": dict(tilt=0, fn_u=90, fn_l=90, ff_u=86, ff_l=88, hn_u=80, hn_l=-100, hf_u=75,
                  hf_l=-95, neck=150, tail=-92, lift=0.0),
    "jumping": dict(tilt=28, fn_u=115, fn_l=35, ff_u=100, ff_l=20, hn_u=-45, hn_l=-25, hf_u=-35,
                    hf_l=-10, neck=125, tail=-115, lift=0.3),
}
_PERSON_POSES = {
    "standing": dict(torso=180, ln_u=3, ln_l=0, lf_u=-3, lf_l=0, an_u=-10, an_l=-4, af_u=10,
                     af_l=8, lift=0.0),
    "sitting": dict(torso=172, ln_u=85, ln_l=95, lf_u=90, lf_l=92, an_u=25, an_l=70, af_u=15,
                    af_l=60, lift=0.0),
    "running": dict(torso=164, ln_u=50, ln_l=-5, lf_u=-40, lf_l=-100, an_u=-45, an_l=45, af_u=45,
                    af_l=120, lift=0.06),
    "lying": dict(torso=92, ln_u=-88, ln_l=-90, lf_u=-92, lf_l=-90, an_u=-86, an_l=-90, af_u=-94,
                  af_l=-92, lift=0.0),
    "jumping": dict(torso=180, ln_u=70, ln_l=-20, lf_u=60, lf_l=-30, an_u=155, an_l=170,
                    af_u=-155, af_l=-170, lift=0.3),
}
_BIRD_POSES = {
    "standing": dict(tilt=25, ln_u=8, ln_l=0, lf_u=-8, lf_l=0, wing=0, head=0, legs=1.0, flat=1.0,
                     lift=0.0),
    "sitting": dict(tilt=10, ln_u=0, ln_l=0, lf_u=0, lf_l=0, wing=0, head=10, legs=0.0, flat=1.15,
                    lift=0.0),
    "running": dict(tilt=-12, ln_u=40, ln_l=20, lf_u=-40, lf_l=-65, wing=35, head=-25, legs=1.0,
                    flat=1.0, lift=0.04),
    "lying": dict(tilt=-3, ln_u=0, ln_l=0, lf_u=0, lf_l=0, wing=0, head=-35, legs=0.0, flat=0.65,
                  lift=0.0),
    "jumping": dict(tilt=20, ln_u=-20, ln_l=-30, lf_u=-30, lf_l=-40, wing=160, head=5, legs=1.0,
                    flat=1.0, lift=0.35),
}
_POSE_TABLES = {"dog": _QUAD_POSES, "cat": _QUAD_POSES, "bird": _BIRD_POSES,
                "person": _PERSON_POSES}
# Parameters jittered as angles (degrees); others (lift, scales) get a small relative jitter.
_NON_ANGLE = ("lift", "legs", "flat")


def _quadruped(kind: str, p: dict[str, float], rng: np.random.Generator) -> list[_Shape]:
    dog = kind == "dog"
    a, b = (0.42, 0.16) if dog else (0.40, 0.13)
    lu, ll, lw = (0.22, 0.20, 0.10) if dog else (0.20, 0.18, 0.085)
    tilt = p["tilt"]

    def body(u, v):
        return _rot(u * a, v * b, tilt)

    shoulder, hip = body(0.72, -0.35), body(-0.72, -0.35)
    shapes: list[_Shape] = []
    shapes += _limb(shoulder, p["ff_u"], p["ff_l"], lu, ll, lw, ROLE_MAIN + _FAR)
    shapes += _limb(hip, p["hf_u"], p["hf_l"], lu, ll, lw, ROLE_MAIN + _FAR)
    tail_base = body(-0.95, 0.3)
    if dog:
        shapes.append(_Shape("capsule", ROLE_MAIN, (*tail_base, *_at(tail_base, p["tail"], 0.26),
                                                    0.07)))
    else:  # a cat's long tail curls up at the end
        mid = _at(tail_base, p["tail"], 0.22)
        shapes.append(_Shape("capsule", ROLE_MAIN, (*tail_base, *mid, 0.06)))
        shapes.append(_Shape("capsule", ROLE_MAIN, (*mid, *_at(mid, p["tail"] - 50, 0.18), 0.06)))
    shapes.append(_ellipse((0.0, 0.0), a, b, tilt, ROLE_MAIN))
    neck_base = body(0.8, 0.35)
    head = _at(neck_base, p["neck"], 0.17 if dog else 0.12)
    hr = 0.14 if dog else 0.125
    shapes.append(_Shape("capsule", ROLE_MAIN, (*neck_base, *head, 0.15 if dog else 0.12)))
    if dog:
        shapes.append(_ellipse((head[0] + 0.12, head[1] - 0.04), 0.11, 0.065, -10, ROLE_MAIN))
        shapes.append(_ellipse((head[0] + 0.21, head[1] - 0.02), 0.035, 0.03, 0, ROLE_DETAIL))
    shapes.append(_ellipse(head, hr, hr, 0, ROLE_MAIN))
    if dog:  # floppy ear hanging behind the eye
        shapes.append(_ellipse((head[0] - 0.05, head[1] - 0.03), 0.05, 0.1, -15, ROLE_SECOND))
    else:  # pointed ears
        for dx in (-0.07, 0.05):
            base_x = head[0] + dx
            shapes.append(_Shape("poly", ROLE_MAIN, ((base_x - 0.05, head[1] + 0.07),
                                                     (base_x + 0.05, head[1] + 0.08),
                                                     (base_x + 0.01, head[1] + 0.2))))
    shapes.append(_ellipse((head[0] + 0.06, head[1] + 0.04), 0.025, 0.025, 0, ROLE_DETAIL))
    shapes += _limb(shoulder, p["fn_u"], p["fn_l"], lu, ll, lw, ROLE_MAIN)
    shapes += _limb(hip, p["hn_u"], p["hn_l"], lu, ll, lw, ROLE_MAIN)
    shapes += _coat(kind, body, rng)
    return shapes


def _coat(kind: str, body, rng: np.random.Generator) -> list[_Shape]:
    """Texture shapes in body coordinates: dog spots, cat stripes across the back."""
    if kind == "dog":
        spots = []
        for _ in range(int(rng.integers(1, 4))):
            c = body(rng.uniform(-0.7, 0.5), rng.uniform(-0.2, 0.6))
            r = rng.uniform(0.05, 0.09)
            spots.append(_ellipse(c, r * 1.3, r, rng.uniform(0, 180), ROLE_SECOND, texture=True))
        return spots
    phase = rng.uniform(0, 0.12)
    stripes = []
    for u in np.arange(-0.85 + phase, 0.8, 0.24):
        stripes.append(_Shape("capsule", ROLE_SECOND, (*body(u, 0.2), *body(u + 0.08, 1.1), 0.045),
                              texture=True))
    return stripes


def _person(p: dict[str, float]) -> list[_Shape]:
    hip = (0.0, 0.0)
    shoulder = _at(hip, p["torso"], 0.42)
    neck_dir = _dir(p["torso"])
    head = (shoulder[0] + 0.14 * neck_dir[0], shoulder[1] + 0.14 * neck_dir[1])
    shapes: list[_Shape] = []
    shapes += _limb(shoulder, p["af_u"], p["af_l"], 0.2, 0.19, 0.075, ROLE_MAIN + _FAR)
    shapes += _limb(hip, p["lf_u"], p["lf_l"], 0.27, 0.27, 0.1, ROLE_SECOND + _FAR)
    shapes.append(_Shape("capsule", ROLE_MAIN, (*hip, *shoulder, 0.19)))
    shapes.append(_ellipse(head, 0.105, 0.105, 0, ROLE_ACCENT))
    # Hair: a cap on the far side of the face, along the torso direction.
    shapes.append(_ellipse((head[0] + 0.045 * neck_dir[0] - 0.03 * neck_dir[1],
                            head[1] + 0.045 * neck_dir[1] + 0.03 * neck_dir[0]),
                           0.09, 0.075, p["torso"] - 180, ROLE_DETAIL))
    shapes += _limb(hip, p["ln_u"], p["ln_l"], 0.27, 0.27, 0.1, ROLE_SECOND)
    shapes += _limb(shoulder, p["an_u"], p["an_l"], 0.2, 0.19, 0.075, ROLE_MAIN)
    return shapes


def _bird(p: dict[str, float]) -> list[_Shape]:
    a, b = 0.3 / math.sqrt(p["flat"]), 0.2 * p["flat"]
    tilt = p["tilt"]

    def body(u, v):
        return _rot(u * a, v * b, tilt)

    shapes: list[_Shape] = []
    hip = body(0.0, -0.7)
    if p["legs"] > 0:
        shapes += _limb(hip, p["lf_u"], p["lf_l"], 0.14, 0.13, 0.05, ROLE_ACCENT + _FAR)
    tail = body(-0.9, 0.1)
    shapes.append(_Shape("poly", ROLE_SECOND, (body(-0.7, 0.35), body(-0.7, -0.3),
                                                _rot(tail[0] - 0.2, tail[1] + 0.06, tilt))))
    raised = p["wing"] > 90  # jumping/flying: wings up and out, outside the body
    if raised:
        shoulder = body(0.1, 0.6)
        tip = _at(shoulder, p["wing"] + 20, 0.36)
        shapes.append(_ellipse(((shoulder[0] + tip[0]) / 2, (shoulder[1] + tip[1]) / 2), 0.19,
                               0.075, p["wing"] + 20 + 90, ROLE_SECOND + _FAR))
    shapes.append(_ellipse((0.0, 0.0), a, b, tilt, ROLE_MAIN))
    head = _rot(a * 0.85 + 0.06, b * 0.8, tilt + p["head"])
    shapes.append(_ellipse(head, 0.12, 0.12, 0, ROLE_MAIN))
    shapes.append(_Shape("poly", ROLE_ACCENT, ((head[0] + 0.09, head[1] + 0.04),
                                               (head[0] + 0.09, head[1] - 0.05),
                                               (head[0] + 0.21, head[1] - 0.01))))
    shapes.append(_ellipse((head[0] + 0.04, head[1] + 0.03), 0.025, 0.025, 0, ROLE_DETAIL))
    if raised:
        shoulder = body(0.1, 0.6)
        tip = _at(shoulder, p["wing"], 0.4)
        shapes.append(_ellipse(((shoulder[0] + tip[0]) / 2, (shoulder[1] + tip[1]) / 2), 0.21,
                               0.08, p["wing"] + 90, ROLE_SECOND))
    else:
        wing_c = body(-0.1, 0.1)
        shapes.append(_ellipse(wing_c, a * 0.6, b * 0.45, tilt - 10 - p["wing"], ROLE_SECOND))
    if p["legs"] > 0:
        shapes += _limb(hip, p["ln_u"], p["ln_l"], 0.14, 0.13, 0.05, ROLE_ACCENT)
    return shapes


def pose_parameters(kind: str, pose: str,
                    offsets: dict[str, float] | None = None) -> dict[str, float]:
    """The joint angles and other parameters of ``pose`` for ``kind``, with ``offsets`` added."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if pose not in POSES:
        raise ValueError(f"unknown pose {pose!r}; expected one of {POSES}")
    params = dict(_POSE_TABLES[kind][pose])
    for key, value in (offsets or {}).items():
        params[key] = params[key] + value
    return params


def sample_offsets(rng: np.random.Generator, kind: str, pose: str,
                   spread_deg: float = 8.0) -> dict[str, float]:
    """Random jitter for every pose parameter: angles by ``spread_deg``, lift by 20%."""
    offsets = {}
    for key, value in _POSE_TABLES[kind][pose].items():
        if key == "legs":  # legs shown or not: part of the pose, never jittered
            offsets[key] = 0.0
        elif key in _NON_ANGLE:
            offsets[key] = float(rng.normal(0.0, 0.08 * max(abs(value), 0.25)))
        else:
            offsets[key] = float(np.clip(rng.normal(0.0, spread_deg), -2 * spread_deg,
                                         2 * spread_deg))
    return offsets


def _local_shapes(subject: Subject) -> tuple[list[_Shape], float]:
    """The subject's shapes in its local frame, and the lift (units) above the ground."""
    params = pose_parameters(subject.kind, subject.pose, subject.offsets)
    rng = np.random.default_rng(subject.texture_seed)
    if subject.kind in ("dog", "cat"):
        shapes = _quadruped(subject.kind, params, rng)
    elif subject.kind == "bird":
        shapes = _bird(params)
    else:
        shapes = _person(params)
    return shapes, max(params["lift"], 0.0)


def _shape_extent(shape: _Shape) -> tuple[float, float, float, float]:
    d = shape.data
    if shape.kind == "ellipse":
        cx, cy, rx, ry, rot = d
        t = math.radians(rot)
        hw = math.hypot(rx * math.cos(t), ry * math.sin(t))
        hh = math.hypot(rx * math.sin(t), ry * math.cos(t))
        return cx - hw, cy - hh, cx + hw, cy + hh
    if shape.kind == "capsule":
        x0, y0, x1, y1, w = d
        return min(x0, x1) - w / 2, min(y0, y1) - w / 2, max(x0, x1) + w / 2, max(y0, y1) + w / 2
    xs, ys = [q[0] for q in d], [q[1] for q in d]
    return min(xs), min(ys), max(xs), max(ys)


def _placed_shapes(subject: Subject) -> tuple[list[_Shape], float]:
    """Shapes in image fractions (x right, y down), and the unit length in image fractions."""
    shapes, lift = _local_shapes(subject)
    ext = [_shape_extent(s) for s in shapes if not s.texture]
    x_mid = (min(e[0] for e in ext) + max(e[2] for e in ext)) / 2
    y_low = min(e[1] for e in ext)
    unit = subject.scale * _KIND_SIZE[subject.kind]
    sign = -1.0 if subject.flip else 1.0

    def tx(x: float, y: float) -> tuple[float, float]:
        return subject.x + sign * unit * (x - x_mid), subject.y - unit * (y - y_low + lift)

    placed = []
    for s in shapes:
        d = s.data
        if s.kind == "ellipse":
            cx, cy = tx(d[0], d[1])
            # Image y points down (reverses the rotation sense) and a flip mirrors x (reverses it
            # again): the image-frame angle is -sign * local angle.
            data = (cx, cy, d[2] * unit, d[3] * unit, -sign * d[4])
        elif s.kind == "capsule":
            data = (*tx(d[0], d[1]), *tx(d[2], d[3]), d[4] * unit)
        else:
            data = tuple(tx(*q) for q in d)
        placed.append(replace(s, data=data))
    return placed, unit


def subject_bbox(subject: Subject) -> tuple[float, float, float, float]:
    """The subject's bounding box (x0, y0, x1, y1) in image fractions, y pointing down."""
    placed, _ = _placed_shapes(subject)
    ext = [_shape_extent(s) for s in placed if not s.texture]
    return (min(e[0] for e in ext), min(e[1] for e in ext), max(e[2] for e in ext),
            max(e[3] for e in ext))


# ---------------------------------------------------------------------------------------------
# Rendering.

def _ellipse_points(cx, cy, rx, ry, rot_deg, n=40):
    """Polygon of an ellipse in image coordinates, rotated by ``rot_deg`` (image frame)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    a = math.radians(rot_deg)
    x, y = rx * np.cos(t), ry * np.sin(t)
    return list(zip(cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: _Shape, size_px: int, value: int) -> None:
    def px(q):
        return q[0] * size_px - 0.5, q[1] * size_px - 0.5

    d = shape.data
    if shape.kind == "ellipse":
        pts = [px(q) for q in _ellipse_points(*d)]
        draw.polygon(pts, fill=value)
    elif shape.kind == "capsule":
        min_w = MIN_STROKE_FRACTION if shape.texture else MIN_LIMB_FRACTION
        w = max(d[4], min_w) * size_px
        (x0, y0), (x1, y1) = px(d[:2]), px(d[2:4])
        length = math.hypot(x1 - x0, y1 - y0)
        if length > 1e-6:
            nx, ny = -(y1 - y0) / length * w / 2, (x1 - x0) / length * w / 2
            draw.polygon([(x0 + nx, y0 + ny), (x1 + nx, y1 + ny), (x1 - nx, y1 - ny),
                          (x0 - nx, y0 - ny)], fill=value)
        for cx, cy in ((x0, y0), (x1, y1)):
            draw.ellipse([cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2], fill=value)
    else:
        draw.polygon([px(q) for q in d], fill=value)


def _supersample(size_px: int) -> int:
    # Odd, so that the middle subpixel sits on the pixel centre; up to about 1300 px drawn.
    return 5 if size_px <= 256 else 3 if size_px <= 640 else 1


def _role_map(subject: Subject, size_px: int) -> np.ndarray:
    """(H, W) uint8: 0 outside the subject, else the role of the pixel's colour.

    PIL fills polygons including their boundary pixels, which at 64 px fattens a 3 px limb by a
    third; drawing at k times the size and sampling each pixel's centre keeps areas true at every
    resolution, so a 256 px render is a sharper copy of the 64 px one.
    """
    placed, _ = _placed_shapes(subject)
    k = _supersample(size_px)
    layers = []
    for texture in (False, True):
        canvas = Image.new("L", (size_px * k, size_px * k), 0)
        draw = ImageDraw.Draw(canvas)
        for s in placed:
            if s.texture == texture:
                _draw_shape(draw, s, size_px * k, s.role)
        layers.append(np.asarray(canvas)[k // 2::k, k // 2::k])
    roles, tex = layers[0].copy(), layers[1]
    on_main = (roles == ROLE_MAIN) & (tex > 0)
    roles[on_main] = tex[on_main]
    return roles


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
        roles = _role_map(subject, size_px)
        srng = np.random.default_rng(subject.texture_seed + 1)
        table = np.zeros((2 * _FAR + 1, 3), np.float32)
        for role, colour in enumerate(PALETTES[subject.kind], start=1):
            table[role] = colour
            table[role + _FAR] = np.asarray(colour, np.float32) * FAR_SHADE
        inside = roles > 0
        colours = table[roles] + srng.uniform(-5, 5, (size_px, size_px, 3)).astype(np.float32)
        img[inside] = colours[inside]
        owner[inside] = index
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    masks = [owner == i for i in range(len(scene.subjects))]
    return image, masks


def render_pose_mask(kind: str, pose: str, size_px: int = 64, x: float = 0.5, y: float = 0.85,
                     scale: float = 0.45, flip: bool = False,
                     offsets: dict[str, float] | None = None) -> np.ndarray:
    """One subject's silhouette, e.g. a target pose mask for sampling.

    Args:
        kind: one of ``KINDS``.
        pose: one of ``POSES``.
        size_px: side of the square mask.
        x, y, scale, flip, offsets: placement and jitter, as in ``Subject``.

    Returns:
        (size_px, size_px) bool array, True on the subject.
    """
    subject = Subject(kind, pose, x=x, y=y, scale=scale, flip=flip, offsets=dict(offsets or {}))
    return _role_map(subject, size_px) > 0


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
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, optimize=True)
    return str(path)
