"""The training photo and its concept masks: reading, checking, joint resize/crop/flip, union sampling.

Masks of any mode are accepted (L, RGB, RGBA, LA, palette, 16-bit): alpha is used when present,
else luminance (for palette images the brightest channel); values are binarised at 0.5. Every file
is opened upright, its EXIF orientation applied (``images.open_image``), as image viewers show it. Image and
masks are resized and center-cropped together, so a pixel of a mask stays on the pixel of the photo
it marked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lowmcgm.errors import UserError
from lowmcgm.images import open_image

# The reference warns about nothing; heavily overlapping masks teach two handles the same pixels.
OVERLAP_WARN_FRACTION = 0.5
# A mask that covers (almost) everything leaves no background to separate concepts from.
FULL_MASK_FRACTION = 0.99
# A mask the centre crop cuts down to less than this share of its pixels has lost its subject (a
# sliver at the edge teaches the handle nothing, and poses it nowhere): refused in training and sampling.
MIN_KEPT_BY_CROP = 0.1


@dataclass
class ConceptImage:
    """The photo and its masks at training resolution.

    Attributes:
        image: (3, R, R) float32 in [-1, 1].
        masks: (N, R, R) float32 in {0, 1}, one per concept, in handle order.
        original_hw: the photo's (height, width) as read, before resize and crop.
        crop_top_left: (top, left) of the crop in the resized photo. SDXL's UNet is conditioned on
            both (``sdxl_conditioning.sdxl_time_ids``), as diffusers' and kohya's SDXL trainers do.
    """

    image: torch.Tensor
    masks: torch.Tensor
    original_hw: tuple[int, int] | None = None  # None: the photo was (R, R) already
    crop_top_left: tuple[int, int] = (0, 0)

    @property
    def num_concepts(self) -> int:
        return self.masks.shape[0]


def load_image(path: str | Path) -> Image.Image:
    """Read the training photo as RGB."""
    img = open_image(Path(path), "Image")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: transparent pixels carry arbitrary colours underneath.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as a float array in [0, 1] (alpha when present, else luminance).

    Returns:
        (H, W) float32.
    """
    img = open_image(Path(path), "Mask")
    if img.mode == "P":
        if "transparency" not in img.info:
            # Label-map palettes (segmentation tools) colour subjects red, green, ...; their luminance
            # can fall below 0.5, so a palette mask counts a pixel by its brightest channel.
            return np.asarray(img.convert("RGB"), dtype=np.float32).max(-1) / 255.0
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        return np.asarray(img.getchannel("A"), dtype=np.float32) / 255.0
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        # 16-bit PNGs open as I;16 or I; both hold 0..65535.
        return arr / 65535.0
    if img.mode == "F":
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def check_masks(masks: list[np.ndarray], paths: list[str], image_size: tuple[int, int]) -> list[str]:
    """Refuse unusable masks with a UserError; return warnings for doubtful ones.

    Args:
        masks: binary (H, W) arrays as from ``load_mask(...) > 0.5``.
        paths: their file names, for messages.
        image_size: the photo's (width, height).
    """
    warnings = []
    w, h = image_size
    for mask, path in zip(masks, paths):
        mh, mw = mask.shape
        if (mw, mh) != (w, h):
            if mw * h == mh * w:  # same shape, other resolution: a plain resize fixes it
                how = f"resize the mask to {w}x{h} (nearest neighbour, so it stays black and white)"
            else:
                how = ("its aspect ratio differs, so it was drawn on another crop of the photo: draw it on "
                       "the photo itself, or crop photo and masks the same way")
            raise UserError(f"Mask {path} is {mw}x{mh} but the image is {w}x{h}: masks must have the "
                            f"image's exact size; {how}.")
        area = float(mask.mean())
        if area == 0.0:
            raise UserError(f"Mask {path} is empty (no pixel above 0.5): mark the subject in white "
                            "(or opaque alpha) on black.")
        if area >= FULL_MASK_FRACTION:
            raise UserError(f"Mask {path} covers the whole image ({area:.0%}): mark only its subject, "
                            "so the background can be told apart.")
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            share = mask_overlap(masks[i], masks[j])
            if share > OVERLAP_WARN_FRACTION:
                warnings.append(f"Masks {paths[i]} and {paths[j]} overlap on {share:.0%} of the "
                                "smaller one; the two handles may learn the same subject.")
    return warnings


def mask_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """The share of the smaller of two (H, W) bool masks that the other covers too (0 when either is empty)."""
    smaller = float(min(a.sum(), b.sum()))
    return float(np.logical_and(a, b).sum()) / smaller if smaller else 0.0


def resize_crop(img: Image.Image, size_px: int, resample: int) -> Image.Image:
    """Resize the short side to ``size_px``, then take the central square."""
    top, left, nh, nw = center_crop_box(img.size, size_px)
    img = img.resize((nw, nh), resample=resample)
    return img.crop((left, top, left + size_px, top + size_px))


def center_crop_box(size: tuple[int, int], size_px: int) -> tuple[int, int, int, int]:
    """(top, left, resized height, resized width) of ``resize_crop`` for a (width, height) picture."""
    w, h = size
    scale = size_px / min(w, h)
    nw, nh = max(size_px, round(w * scale)), max(size_px, round(h * scale))
    return (nh - size_px) // 2, (nw - size_px) // 2, nh, nw


def kept_by_center_crop(mask: np.ndarray, width: int, height: int) -> float:
    """The share of ``mask``'s pixels inside the centre crop that covering ``width`` x ``height`` keeps.

    Args:
        mask: (H, W) bool, at its own size (the crop is scaled to it: no resize needed).
    """
    h, w = mask.shape
    scale = max(width / w, height / h)
    crop_w, crop_h = width / scale, height / scale  # the crop window in the mask's own pixels
    left, top = round((w - crop_w) / 2), round((h - crop_h) / 2)
    total = int(mask.sum())
    inside = int(mask[top:top + round(crop_h), left:left + round(crop_w)].sum())
    return inside / total if total else 0.0


def check_center_crop_keeps(mask: np.ndarray, width: int, height: int, what: str) -> None:
    """Refuse a mask whose subject the centre crop cuts (almost) away: training and sampling alike.

    Args:
        what: the message's subject, e.g. ``Mask cat.png`` or ``Pose run.png for <asset0>``.
    """
    kept = kept_by_center_crop(mask, width, height)
    if kept < MIN_KEPT_BY_CROP:
        h, w = mask.shape
        raise UserError(f"{what} keeps only {kept:.0%} of its pixels in the central {width}x{height} crop of its "
                        f"{w}x{h} picture (at least {MIN_KEPT_BY_CROP:.0%} needed): its subject lies outside the "
                        "central square of the photo; crop the photo (or draw the mask) around it.")


def load_concept_image(image_path: str, mask_paths: list[str], size_px: int) -> tuple[ConceptImage, list[str]]:
    """Read, check, and jointly resize/crop the photo and its masks.

    Returns:
        The prepared ``ConceptImage`` and a list of warnings.
    """
    if not mask_paths:
        raise UserError("No masks given: pass one --mask per subject.")
    image = load_image(image_path)
    binary = [load_mask(p) > 0.5 for p in mask_paths]
    warnings = check_masks(binary, list(mask_paths), image.size)
    top, left, _, _ = center_crop_box(image.size, size_px)
    original_hw = (image.size[1], image.size[0])
    image = resize_crop(image, size_px, Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    resized = []
    for mask, path in zip(binary, mask_paths):
        check_center_crop_keeps(mask, size_px, size_px, f"Mask {path}")
        m = resize_crop(Image.fromarray(mask.astype(np.uint8) * 255), size_px, Image.Resampling.NEAREST)
        m = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0 > 0.5).float()
        if m.sum() == 0:  # inside the crop, but too thin to survive the resize
            raise UserError(f"Mask {path} is empty after center-cropping to a square and resizing to {size_px} px: "
                            "its subject lies outside the central square of the photo or is too thin; crop the "
                            "photo first.")
        resized.append(m)
    return ConceptImage(pixels.contiguous(), torch.stack(resized), original_hw, (top, left)), warnings


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-neighbour resize of (..., H, W) masks to (..., size, size), as the reference does."""
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    return F.interpolate(flat, size=(size, size), mode="nearest").reshape(*lead, size, size)


def sample_concepts(num_concepts: int, k: int, generator: torch.Generator) -> list[int]:
    """``k`` distinct concept indices in random order (union sampling, Break-a-scene sec. 3.2)."""
    return torch.randperm(num_concepts, generator=generator)[:k].tolist()


def sample_num_concepts(num_concepts: int, generator: torch.Generator) -> int:
    """k uniform in 1..N."""
    return int(torch.randint(1, num_concepts + 1, (1,), generator=generator))


def build_prompt(handles: list[str]) -> str:
    """The training prompt, e.g. ``a photo of <asset2> and <asset0>`` (the reference's wording)."""
    return "a photo of " + " and ".join(handles)


def solid_background(image: torch.Tensor, union: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Replace everything outside ``union`` (R, R) with one random colour (the paper's sec. 3)."""
    colour = torch.rand(3, 1, 1, generator=generator) * 2 - 1
    return image * union + colour * (1 - union)


# ------------------------------------------------------------------------------------------------
# Mask-aware training (issue 12): joint affine augmentation, and what the mask encoder reads.

def draw_affine(masks: torch.Tensor, generator: torch.Generator, shift: float, scale_min: float,
                scale_max: float, rotate_deg: float) -> torch.Tensor:
    """A random shift, scale and rotation that keeps every pixel of ``masks`` in frame.

    Four numbers are drawn from ``generator`` whatever the masks, so the draws of the steps after
    this one (and a resumed run's) do not depend on the content. A scale too large for the subjects
    to fit is lowered, and the shift is clamped so their bounding box stays inside the image.

    Args:
        masks: (k, R, R) the selected masks; their union must not be empty.
        shift: largest shift as a fraction of the side; scale_min, scale_max: scale range;
            rotate_deg: largest rotation either way.

    Returns:
        (2, 3) float64 ``theta`` for ``apply_affine``: it maps output to input coordinates in
        ``F.affine_grid``'s normalised frame (pixel edges at -1 and 1), which is the same at every
        resolution, so one ``theta`` moves a 512 px photo, its 64 px latent and 16 px masks alike.
    """
    u = torch.rand(4, generator=generator, dtype=torch.float64)
    scale = scale_min + float(u[0]) * (scale_max - scale_min)
    angle = math.radians((2 * float(u[1]) - 1) * rotate_deg)
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64)
    union = masks.amax(0) > 0.5
    rows, cols = torch.nonzero(union.any(1)).flatten(), torch.nonzero(union.any(0)).flatten()
    h, w = union.shape
    x0, x1 = 2 * int(cols[0]) / w - 1, 2 * (int(cols[-1]) + 1) / w - 1
    y0, y1 = 2 * int(rows[0]) / h - 1, 2 * (int(rows[-1]) + 1) / h - 1
    corners = torch.tensor([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], dtype=torch.float64).T  # (2, 4)
    turned = rot @ corners
    extent = float((turned.amax(1) - turned.amin(1)).max())
    scale = min(scale, 2.0 / extent)  # the subjects' box must fit in the frame (side 2)
    moved = scale * turned
    lo, hi = moved.amin(1), moved.amax(1)
    wanted = (2 * u[2:] - 1) * 2 * shift
    offset = torch.minimum(torch.maximum(wanted, -1 - lo), 1 - hi)  # (2,) kept in frame
    inverse = rot.T / scale
    return torch.cat([inverse, (-inverse @ offset)[:, None]], 1)


def apply_affine(x: torch.Tensor, theta: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Resample (..., H, W) ``x`` by ``theta`` from ``draw_affine`` (bilinear).

    ``padding``: 'border' repeats the edge for photos and latents (no duplicated subject, unlike
    reflection), 'zeros' for masks. Binarise masks afterwards (``> 0.5``).
    """
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:]).float()
    grid = F.affine_grid(theta.to(torch.float32)[None].expand(flat.shape[0], 2, 3), list(flat.shape),
                         align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return out.reshape(*lead, *x.shape[-2:]).to(x.dtype)


def perturb_mask(mask: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """A rough version of a binary (H, W) mask, like one drawn by hand.

    A random dilation or erosion (square element) moves the boundary by up to ``strength`` x side,
    then a coarse redraw (average over blocks of up to 2 x ``strength`` x side, bilinear back,
    threshold) rounds and blocks its outline. A step that would empty the mask is skipped. Two
    numbers are drawn from ``generator`` whatever the mask.
    """
    u = torch.rand(2, generator=generator, dtype=torch.float64)
    side = mask.shape[-1]
    m = mask.float()[None, None]
    radius = round(abs(2 * float(u[0]) - 1) * strength * side)
    if radius:
        pooled = F.max_pool2d(m if u[0] >= 0.5 else 1 - m, 2 * radius + 1, stride=1, padding=radius)
        moved = pooled if u[0] >= 0.5 else 1 - pooled
        m = moved if moved.any() else m
    block = 1 + round(float(u[1]) * 2 * strength * side)
    if block > 1:
        coarse = F.adaptive_avg_pool2d(m, (math.ceil(mask.shape[-2] / block), math.ceil(side / block)))
        redrawn = (F.interpolate(coarse, size=mask.shape[-2:], mode="bilinear", align_corners=False) > 0.5).float()
        m = redrawn if redrawn.any() else m
    return m[0, 0].to(mask.dtype)


def build_encoder_masks(masks: torch.Tensor, size_px: int, dropout: float, perturbation: float,
                        generator: torch.Generator) -> torch.Tensor:
    """What the mask encoder reads for (k, R, R) selected masks: resized to ``size_px`` (nearest, as
    the encoder does), perturbed when ``perturbation`` > 0 (``perturb_mask``), and the blank mask
    with probability ``dropout`` each. The losses keep the real masks.

    Returns:
        (k, size_px, size_px) float32 in {0, 1}.
    """
    small = resize_masks(masks, size_px)
    if perturbation > 0:
        small = torch.stack([perturb_mask(m, perturbation, generator) for m in small])
    if dropout > 0:
        blank = torch.rand(small.shape[0], generator=generator) < dropout
        small = small * (~blank).float()[:, None, None]
    return small
