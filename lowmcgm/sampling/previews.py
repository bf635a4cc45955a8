"""Pictures for people: the contact sheet, attention pictures and the loss curve, and PNG writing.

Everything here is drawn with PIL (no plotting library is needed at run time) from data other
modules computed: ``sampler.py`` produces images, pose masks and attention maps; the trainer writes
``loss_history.json``. Every file is written under a temporary name and renamed, so an interrupted
run never leaves half a PNG.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from lowmcgm.errors import UserError
from lowmcgm.runs.write_guard import replacing, write_text_whole

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
FAINT = (150, 150, 150)
FONT_PX = 12
PAD_PX = 6
# Tiny-model images are 64 px: cells are enlarged to stay readable, SD images shrunk to stay small.
MIN_CELL_PX, MAX_CELL_PX = 128, 256
LOSS_TERMS = ("total", "rec", "attn", "mask_attn", "prior")
LOSS_COLOURS = {"total": (20, 20, 20), "rec": (31, 119, 180), "attn": (214, 39, 40),
                "mask_attn": (44, 160, 44), "prior": (148, 103, 189)}
EMA_DECAY = 0.9  # the loss of one step is noisy (one random timestep): draw a smoothed line too


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=FONT_PX)
    except (TypeError, ImportError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def save_png(image: Image.Image, path: Path, text: dict[str, str] | None = None) -> Path:
    """Write ``image`` as PNG atomically, with ``text`` as UTF-8 (iTXt) chunks.

    Args:
        image: any PIL image.
        path: destination; its folder must exist.
        text: chunk name -> value, e.g. ``{"prompt": "a photo of <asset0>"}``.
    """
    path = Path(path)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    with replacing(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def save_json(data: Any, path: Path) -> Path:
    """Write JSON atomically (temporary name, then rename)."""
    return write_text_whole(path, json.dumps(data, indent=2, allow_nan=False))  # NaN is not JSON: never write it


def mask_to_image(mask: np.ndarray | None, size: tuple[int, int]) -> Image.Image:
    """A pose mask as a picture: subject white on black; ``None`` (the blank mask) all black.

    Args:
        mask: (H, W) bool or {0, 1} array, or None.
        size: (width, height) of the picture when ``mask`` is None.
    """
    if mask is None:
        return Image.new("RGB", size, (0, 0, 0))
    return Image.fromarray((np.asarray(mask) > 0.5).astype(np.uint8) * 255).convert("RGB")


def _fit(image: Image.Image, cell_px: int, resample: int) -> Image.Image:
    scale = cell_px / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)


def _cell_px(images: list[Image.Image]) -> int:
    side = max((max(im.size) for im in images), default=MIN_CELL_PX)
    return min(max(side, MIN_CELL_PX), MAX_CELL_PX)


def _clip_text(draw: ImageDraw.ImageDraw, text: str, width_px: int, font: ImageFont.ImageFont) -> str:
    """``text`` cut to fit ``width_px`` with "..." appended, in time linear in its length.

    Every glyph is at least a pixel wide, so no more than ``width_px`` characters can fit: the rest
    is dropped unmeasured, and the longest prefix that fits is found by bisection (measuring one
    character fewer at a time took minutes for a 2000-word prompt).
    """
    if draw.textlength(text, font=font) <= width_px:
        return text
    text = text[:max(width_px, 0)]
    low, high = 0, len(text)  # text[:low] + "..." fits (or low == 0); text[:high + 1] + "..." does not
    while low < high:
        mid = (low + high + 1) // 2
        if draw.textlength(text[:mid] + "...", font=font) <= width_px:
            low = mid
        else:
            high = mid - 1
    return text[:low] + "..."


@dataclass
class SheetRow:
    """One prompt on the contact sheet: its pose masks (left) beside its images (right).

    Attributes:
        title: the prompt (and anything worth saying about it).
        poses: (label, picture) per mask token, e.g. ``("<asset0>: run.png", mask image)``.
        images: the generated images, with a caption each (usually the seed).
    """

    title: str
    poses: list[tuple[str, Image.Image]] = field(default_factory=list)
    images: list[tuple[str, Image.Image]] = field(default_factory=list)


def render_contact_sheet(rows: list[SheetRow]) -> Image.Image:
    """Draw each prompt as a row: title, pose masks, a gap, then its images, each captioned."""
    font = _font()
    cell = _cell_px([im for row in rows for _, im in row.images + row.poses])
    line = FONT_PX + 4
    gap = 3 * PAD_PX  # between the masks and the images, so the two groups read apart
    widths = [len(r.poses) * (cell + PAD_PX) + (gap if r.poses else 0) + len(r.images) * (cell + PAD_PX)
              for r in rows]
    width = PAD_PX + max(widths + [4 * cell])
    row_h = line + cell + line + PAD_PX
    sheet = Image.new("RGB", (width, PAD_PX + row_h * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        top = PAD_PX + r * row_h
        draw.text((PAD_PX, top), _clip_text(draw, row.title, width - 2 * PAD_PX, font), fill=INK, font=font)
        x = PAD_PX
        cells = [(label, im, Image.Resampling.NEAREST) for label, im in row.poses]
        cells += [(label, im, Image.Resampling.BICUBIC) for label, im in row.images]
        for i, (label, im, resample) in enumerate(cells):
            if row.poses and i == len(row.poses):
                x += gap
            small = _fit(im.convert("RGB"), cell, resample)
            sheet.paste(small, (x + (cell - small.width) // 2, top + line + (cell - small.height) // 2))
            if resample == Image.Resampling.NEAREST:  # a frame: black masks vanish on white otherwise
                draw.rectangle((x, top + line, x + cell - 1, top + line + cell - 1), outline=FAINT)
            draw.text((x, top + line + cell + 2), _clip_text(draw, label, cell, font), fill=INK, font=font)
            x += cell + PAD_PX
    return sheet


def _heat(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8, dark blue through red to yellow."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([[0, 0, 80], [180, 0, 60], [255, 120, 0], [255, 255, 120]], dtype=np.float32)
    pos = v * (len(stops) - 1)
    low = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = pos - low
    return (stops[low[..., 0]] * (1 - frac) + stops[low[..., 0] + 1] * frac).astype(np.uint8)


def render_attention_picture(image: Image.Image, maps: list[tuple[str, torch.Tensor]],
                             title: str = "") -> Image.Image:
    """The sample beside each token's cross-attention map laid over it.

    Args:
        image: the generated image.
        maps: (label, (h, w) float map) per handle and mask token; each map is scaled to its own
            max, as the attention loss does, so the shape of each map is what shows.
        title: a line above the pictures (prompt, step).

    Returns:
        One picture: the image, then one overlay per map, captioned with its label.
    """
    cell = _cell_px([image])
    base = _fit(image.convert("RGB"), cell, Image.Resampling.BICUBIC)
    tiles = [("image", base)]
    grey = np.asarray(base.convert("L"), dtype=np.float32)[..., None] / 255.0
    for label, amap in maps:
        m = amap.detach().float().cpu()
        m = m / m.max().clamp_min(1e-12)
        up = F.interpolate(m[None, None], size=(base.height, base.width), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        # Half heat, half the image in grey: the map shows where, the image shows what is there.
        mixed = 0.6 * _heat(up).astype(np.float32) + 0.4 * 255.0 * grey
        tiles.append((label, Image.fromarray(mixed.clip(0, 255).astype(np.uint8))))
    row = SheetRow(title=title, images=tiles)
    return render_contact_sheet([row])


def _ema(values: list[float]) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else EMA_DECAY * acc + (1 - EMA_DECAY) * v
        out.append(acc)
    return out


def render_loss_curve(history: list[dict[str, float]], width_px: int = 800,
                      panel_px: int = 140) -> Image.Image:
    """One panel per loss term over training steps, with the phase boundary marked.

    Each term gets its own y-range: the reconstruction loss and the attention losses differ by
    orders of magnitude, and one shared axis would flatten all but the largest.

    Args:
        history: the trainer's ``loss_history.json``: dicts with ``phase``, ``step`` and the
            terms of ``LOSS_TERMS``.
    """
    font = _font()
    terms = [t for t in LOSS_TERMS if any(abs(float(h.get(t, 0.0))) > 0 for h in history)] or ["total"]
    left, right, top_pad = 70, 16, 22
    image = Image.new("RGB", (width_px, PAD_PX + len(terms) * (panel_px + top_pad) + 20), BACKGROUND)
    draw = ImageDraw.Draw(image)
    n = len(history)
    boundary = next((i for i, h in enumerate(history) if h.get("phase") == 2), None)
    plot_w = width_px - left - right

    def x_of(i: int) -> float:
        return left + (plot_w * i / max(n - 1, 1))

    for p, term in enumerate(terms):
        y0 = PAD_PX + p * (panel_px + top_pad) + top_pad
        values = [float(h.get(term, 0.0)) for h in history]
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        if math.isclose(low, high):
            low, high = low - 0.5, high + 0.5

        def y_of(v: float) -> float:
            return y0 + panel_px - panel_px * (v - low) / (high - low)

        draw.rectangle((left, y0, left + plot_w, y0 + panel_px), outline=FAINT)
        draw.text((left, y0 - top_pad + 4), term, fill=LOSS_COLOURS[term], font=font)
        draw.text((4, y0), f"{high:.4g}", fill=INK, font=font)
        draw.text((4, y0 + panel_px - FONT_PX), f"{low:.4g}", fill=INK, font=font)
        if boundary:
            bx = x_of(boundary)
            for yy in range(int(y0), int(y0 + panel_px), 6):  # dashed: phase 2 starts here
                draw.line((bx, yy, bx, yy + 3), fill=FAINT)
        if n == 1:
            draw.ellipse((x_of(0) - 2, y_of(values[0]) - 2, x_of(0) + 2, y_of(values[0]) + 2),
                         fill=LOSS_COLOURS[term])
        elif n > 1:
            faint = tuple(int(c + (255 - c) * 0.65) for c in LOSS_COLOURS[term])
            draw.line([(x_of(i), y_of(v)) for i, v in enumerate(values)], fill=faint, width=1)
            draw.line([(x_of(i), y_of(v)) for i, v in enumerate(_ema(values))], fill=LOSS_COLOURS[term],
                      width=2)
    caption = f"{n} steps" + (f"; phase 2 from step {boundary + 1} (dashed)" if boundary else "")
    draw.text((left, image.height - 18), caption, fill=INK, font=font)
    return image


def save_loss_curve(history_path: Path, png_path: Path) -> Path:
    """Read ``loss_history.json`` and write its curve as a PNG."""
    try:
        history = json.loads(Path(history_path).read_text())
    except FileNotFoundError as exc:
        raise UserError(f"No loss history at {history_path}: was training run in that folder?") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{history_path} is not valid JSON ({exc}).") from exc
    return save_png(render_loss_curve(history), png_path)
