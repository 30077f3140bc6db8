"""Load any photo as 8-bit RGB, resize-and-crop it, and group sizes into aspect-ratio buckets.

Every failure a user can cause (empty, truncated, non-image or oversized file) is a one-line
:class:`~accord.errors.DataError` that names the file and says what to do.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConfigError, DataError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "assign_bucket",
    "image_size",
    "load_mask",
    "load_rgb",
    "make_buckets",
    "plan_resize_and_crop",
    "resize_and_crop",
    "to_rgb",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: larger than any camera photo, far below a decompression bomb
_EXIF_ORIENTATION = 0x0112


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse empty files and images above ``max_pixels``."""
    try:
        nbytes = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check the path") from None
    if nbytes == 0:
        raise DataError(f"{path}: file is empty (0 bytes); re-copy the image or remove it")
    try:
        with warnings.catch_warnings():  # the size check below is ours; PIL's warning would duplicate it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError:
        raise DataError(
            f"{path}: image is too large (over {Image.MAX_IMAGE_PIXELS * 2:,} pixels, above the limit of "
            f"{min(max_pixels, Image.MAX_IMAGE_PIXELS * 2):,}); downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image; remove it or convert it to PNG/JPEG") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: {_reason(e)}; re-copy or re-export it, or remove it") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise DataError(
            f"{path}: image is {w}x{h} ({w * h:,} pixels), above the limit of {max_pixels:,}; "
            "downscale it first or raise max_pixels"
        )
    return img


def _reason(e: Exception) -> str:
    text = " ".join(str(e).split())  # one line
    return "file is truncated" if "truncated" in text.lower() else f"cannot decode image ({text})"


def image_size(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` as :func:`load_rgb` would return it (EXIF rotation applied), from the header only."""
    path = Path(path)
    with _open(path, max_pixels) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a broken EXIF block is ignored here exactly as exif_transpose ignores it
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """Integer (16/32-bit) and float grey images → ``L``, scaling the range instead of clipping it.

    ``I;16*`` is scaled by 255/65535. Pillow decodes 16-bit PNG/TIFF to ``I;16`` or ``I``, so ``I``
    is taken to hold 16-bit samples too. ``F`` is taken as [0, 1] when its maximum is ≤ 1, else [0, 255].
    """
    a = np.asarray(img)
    if img.mode == "F":
        a = a.astype(np.float64)
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        a = np.nan_to_num(a * scale)
    else:
        a = np.clip(a.astype(np.float64), 0, 65535) * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """Any PIL mode → 8-bit ``RGB``; transparency is composited on ``background`` (white)."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _scale_to_8bit(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def _load(path, max_pixels: int) -> Image.Image:
    """Fully decoded, EXIF-rotated image in its own mode."""
    path = Path(path)
    img = _open(path, max_pixels)
    try:
        with img:
            img.load()
            return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: {_reason(e)}; re-copy or re-export it, or remove it") from None


def load_rgb(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file to 8-bit RGB, honouring EXIF orientation.

    Modes ``1``/``L``/``P``/``CMYK``/``YCbCr``… are converted; ``LA``/``RGBA``/``P`` with transparency
    are composited on white; 16-bit images are scaled to 8 bits. The pixel count is checked from
    the header against ``max_pixels`` *before* decoding. Raises :class:`DataError` naming the file.
    """
    img = _load(path, max_pixels)
    try:
        return to_rgb(img)
    except (OSError, ValueError) as e:  # e.g. an exotic mode PIL cannot convert
        raise DataError(f"{path}: cannot convert {img.mode} image to RGB ({e}); re-export it as RGB") from None


def load_mask(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A mask as an ``L`` image (255 = the personal concept, 0 = background).

    A mask with (non-trivial) transparency uses its alpha channel, so a cut-out PNG works as a mask;
    otherwise its luminance is used.
    """
    img = _load(path, max_pixels)
    if img.mode.startswith("I") or img.mode == "F":
        return _scale_to_8bit(img)
    if _has_alpha(img):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
    return img.convert("L")


# ---- resize and crop -----------------------------------------------------------------------------


def _target(resolution) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    w, h = resolution
    return int(w), int(h)


def plan_resize_and_crop(
    width: int, height: int, resolution, center_crop: bool = True, generator: torch.Generator | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((resized_w, resized_h), (top, left))``: scale to cover ``resolution``, then crop there.

    ``resolution`` is an int (square) or ``(width, height)``. Random crops draw from ``generator``
    (a ``torch.Generator``), so they are reproducible.
    """
    tw, th = _target(resolution)
    scale = max(tw / width, th / height)
    rw, rh = max(tw, round(width * scale)), max(th, round(height * scale))
    if center_crop:
        top, left = (rh - th) // 2, (rw - tw) // 2
    else:
        top = int(torch.randint(0, rh - th + 1, (1,), generator=generator))
        left = int(torch.randint(0, rw - tw + 1, (1,), generator=generator))
    return (rw, rh), (top, left)


def resize_and_crop(
    img: Image.Image, resolution, center_crop: bool = True, generator: torch.Generator | None = None
) -> Image.Image:
    """Resize so the image covers ``resolution`` (int or ``(width, height)``), then crop to it."""
    (rw, rh), (top, left) = plan_resize_and_crop(img.width, img.height, resolution, center_crop, generator)
    tw, th = _target(resolution)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), Image.LANCZOS)
    return img.crop((left, top, left + tw, top + th))


# ---- aspect-ratio buckets ------------------------------------------------------------------------


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """``(width, height)`` sizes with about ``resolution²`` pixels, sides multiples of ``step``.

    For each width ``w`` (a multiple of ``step``) the height is the largest multiple of ``step``
    with ``w·h ≤ resolution²``; sizes whose long/short side ratio exceeds ``max_aspect`` are dropped.
    Follows the aspect-ratio bucketing of NovelAI / kohya-ss sd-scripts. Sorted by aspect ratio.
    """
    if step <= 0 or resolution <= 0 or resolution % step:
        raise ConfigError(
            f"resolution {resolution} is not a positive multiple of the bucket step {step}; "
            f"set resolution to a multiple of {step} or choose a smaller step"
        )
    if max_aspect < 1:
        raise ConfigError(f"max_aspect must be ≥ 1, got {max_aspect}")
    area = resolution * resolution
    buckets = set()
    for w in range(step, int(resolution * max_aspect) + 1, step):
        h = (area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_aspect:
            buckets.add((w, h))
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def assign_bucket(width: int, height: int, buckets) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``width/height`` (in log space; larger area on ties)."""
    if not buckets:
        raise ConfigError("no aspect-ratio buckets given; build them with make_buckets(resolution)")
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def _atomic_save(img: Image.Image, path: Path, **save_kwargs) -> None:
    """Write via a hidden temporary file and ``os.replace``, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        img.save(tmp, format=save_kwargs.pop("format", "PNG"), **save_kwargs)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
