"""Opening an image file safely: one place for every photo, mask and pose mask lowmcgm reads.

An image is opened the way image viewers show it: its EXIF orientation applied (phone photos
are stored sideways with a rotation tag). A file whose header declares more pixels than
``limits.MAX_IMAGE_PIXELS`` (a decompression bomb, or a photo too large to be meant) and an
animated or multi-page file (which would silently give its first frame) are refused before
decoding. Reading channels and binarising stay in ``data.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from lowmcgm.errors import UserError
from lowmcgm.limits import MAX_IMAGE_PIXELS


def open_image(path: Path, what: str) -> Image.Image:
    """Open, check and decode ``path``; return it upright (EXIF orientation applied).

    Args:
        path: the file.
        what: ``Image``, ``Mask``, ``Pose``...: the first word of every message.

    Raises:
        UserError: missing, a folder, unreadable, not an image, truncated, larger than
            ``MAX_IMAGE_PIXELS``, or more than one frame.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}.")
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not an image file.")
    try:
        with warnings.catch_warnings():
            # Pillow warns past 89 MP; our own bound below is lower and says what to do.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        _check_size_and_frames(img, path, what)
        img.load()  # decode now: a truncated file fails here, not halfway through training
        upright = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:  # past 179 MP Pillow refuses in open()
        raise UserError(f"{what} {path} declares more pixels than lowmcgm reads ({MAX_IMAGE_PIXELS // 2**20} "
                        "megapixels; Pillow calls it a decompression bomb): downscale it first.") from exc
    except UnidentifiedImageError as exc:
        raise UserError(f"{what} {path} is not an image PIL can read (PNG or JPEG expected).") from exc
    except PermissionError as exc:
        raise UserError(f"{what} {path} cannot be read (permission denied): check its permissions.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{what} {path} could not be decoded ({exc}); the file may be truncated.") from exc
    return upright if upright is not None else img


def _check_size_and_frames(img: Image.Image, path: Path, what: str) -> None:
    """Refuse from the header alone: too many pixels, or several frames."""
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise UserError(f"{what} {path} declares {w}x{h} pixels ({w * h / 2**20:.0f} megapixels), more than "
                        f"lowmcgm reads ({MAX_IMAGE_PIXELS // 2**20} megapixels): downscale it first.")
    frames = getattr(img, "n_frames", 1)
    # MPO is how many cameras and phones store a JPEG: the photo first, then previews or a depth
    # map. Its first frame is the photo, so it is read as the JPEG it is.
    if frames > 1 and img.format != "MPO":
        raise UserError(f"{what} {path} has {frames} frames (an animated or multi-page file): save the one frame "
                        "you mean as a PNG or JPEG.")
