"""Subject silhouettes: the geometry of a dog, cat, bird or person in a pose, placed and drawn.

Each subject is a silhouette of body, head and limbs whose joint angles come from its pose
("sitting", "standing", "running", "lying", "jumping") plus a continuous jitter, so poses vary
smoothly and still differ visibly (lying is wide, sitting is compact and tall). Shapes are kept in
image fractions and drawn at the requested resolution, so a 256 px render is a sharper copy of the
64 px one; limbs are at least ``MIN_LIMB_FRACTION`` of the image wide (3.2 px at 64 px) so a 2x or
4x VAE keeps them.

This module owns pose tables, shape building, placement and drawing a subject into a role map (which
palette colour each pixel takes) or a mask. Colours, backgrounds, whole scenes and captions are
``scenes.py``'s job.

Example::

    subject = Subject("dog", "running", x=0.4, flip=True)
    x0, y0, x1, y1 = subject_bbox(subject)           # image fractions, y pointing down
    mask = render_pose_mask("cat", "sitting", 64)    # (64, 64) bool
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("dog", "cat", "bird", "person")
POSES = ("sitting", "standing", "running", "lying", "jumping")

# Thinnest limb, as a fraction of the image side: 3.2 px at 64 px, so a 4x VAE still sees it.
MIN_LIMB_FRACTION = 3.2 / 64
# Thinnest texture stroke (cat stripes): thinner than limbs, still a pixel and a half at 64 px.
MIN_STROKE_FRACTION = 1.6 / 64

# Subject roles: index into a subject's palette; + FAR_ROLE_OFFSET marks the far-side limbs,
# drawn darker.
ROLE_MAIN, ROLE_SECOND, ROLE_ACCENT, ROLE_DETAIL = 1, 2, 3, 4
FAR_ROLE_OFFSET = 4

# Subject size relative to Subject.scale: a bird is small, a person tall.
_KIND_SIZE = {"dog": 1.0, "cat": 0.9, "bird": 0.8, "person": 0.8}


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
    shapes += _limb(shoulder, p["ff_u"], p["ff_l"], lu, ll, lw, ROLE_MAIN + FAR_ROLE_OFFSET)
    shapes += _limb(hip, p["hf_u"], p["hf_l"], lu, ll, lw, ROLE_MAIN + FAR_ROLE_OFFSET)
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
    shapes += _limb(shoulder, p["af_u"], p["af_l"], 0.2, 0.19, 0.075, ROLE_MAIN + FAR_ROLE_OFFSET)
    shapes += _limb(hip, p["lf_u"], p["lf_l"], 0.27, 0.27, 0.1, ROLE_SECOND + FAR_ROLE_OFFSET)
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
        shapes += _limb(hip, p["lf_u"], p["lf_l"], 0.14, 0.13, 0.05, ROLE_ACCENT + FAR_ROLE_OFFSET)
    tail = body(-0.9, 0.1)
    shapes.append(_Shape("poly", ROLE_SECOND, (body(-0.7, 0.35), body(-0.7, -0.3),
                                                _rot(tail[0] - 0.2, tail[1] + 0.06, tilt))))
    raised = p["wing"] > 90  # jumping/flying: wings up and out, outside the body
    if raised:
        shoulder = body(0.1, 0.6)
        tip = _at(shoulder, p["wing"] + 20, 0.36)
        shapes.append(_ellipse(((shoulder[0] + tip[0]) / 2, (shoulder[1] + tip[1]) / 2), 0.19,
                               0.075, p["wing"] + 20 + 90, ROLE_SECOND + FAR_ROLE_OFFSET))
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
# Drawing.

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


def render_role_map(subject: Subject, size_px: int) -> np.ndarray:
    """Which palette colour each pixel of ``subject`` takes (``scenes.render_scene`` colours it).

    PIL fills polygons including their boundary pixels, which at 64 px fattens a 3 px limb by a
    third; drawing at k times the size and sampling each pixel's centre keeps areas true at every
    resolution, so a 256 px render is a sharper copy of the 64 px one.

    Args:
        subject: what to draw, where.
        size_px: side of the square map.

    Returns:
        (size_px, size_px) uint8: 0 outside the subject, else the pixel's role (``ROLE_MAIN`` ...
        ``ROLE_DETAIL``, plus ``FAR_ROLE_OFFSET`` on far-side limbs).
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
    return render_role_map(subject, size_px) > 0
