"""Reading images and subject masks for evaluation.

A *mask* is anything :func:`to_mask` understands: a PIL image (mode ``L``/``1``/``RGB``, white =
subject), a numpy array or a tensor (nonzero = subject), or a path to a mask file. A *segmenter*
is a callable ``segmenter(image: PIL.Image) -> mask``; plug in any subject segmentation model
(the paper uses a reference segmentation model, Zhang et al. 2024b). :func:`apply_mask` pastes
the subject onto a flat background so that CLIP-I / DINO-I see only the subject.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from ..errors import ConfigError, DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "Mask",
    "Segmenter",
    "apply_mask",
    "apply_masks",
    "list_images",
    "load_image",
    "load_segmenter",
    "mask_files_for",
    "to_mask",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
Mask = Union[Image.Image, np.ndarray, "Any", str, Path]
Segmenter = Callable[[Image.Image], Any]


def load_image(path: str | Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied."""
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}); remove or replace the file") from None


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images; check the path")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found; check the path")
    return files


def to_mask(mask: Mask, size: tuple[int, int]) -> Image.Image:
    """A binary ``L`` mask (255 = subject) of the given (width, height)."""
    if isinstance(mask, (str, Path)):
        mask = Image.open(mask)
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L")) > 127
    else:
        arr = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask)
        arr = arr.squeeze()
        if arr.ndim == 3:
            arr = arr.max(axis=-1 if arr.shape[-1] in (1, 3, 4) else 0)
        arr = arr > (0.5 if arr.dtype.kind == "f" else 0)
    m = Image.fromarray((arr * 255).astype(np.uint8), mode="L")
    return m if m.size == size else m.resize(size, Image.NEAREST)


def apply_mask(image: Image.Image, mask: Mask | None, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The subject pasted onto a flat ``fill`` background (the image itself when ``mask`` is None)."""
    if mask is None:
        return image
    background = Image.new("RGB", image.size, fill)
    return Image.composite(image.convert("RGB"), background, to_mask(mask, image.size))


def apply_masks(
    images: Sequence[Image.Image],
    masks: Sequence[Mask | None] | None = None,
    segmenter: Segmenter | None = None,
    fill: tuple[int, int, int] = (255, 255, 255),
) -> list[Image.Image]:
    """Mask each image with its given mask, else with ``segmenter(image)``, else leave it as is."""
    if masks is not None and len(masks) != len(images):
        raise ValueError(f"{len(masks)} masks for {len(images)} images")
    out = []
    for i, image in enumerate(images):
        mask = masks[i] if masks is not None else None
        if mask is None and segmenter is not None:
            mask = segmenter(image)
        out.append(apply_mask(image, mask, fill))
    return out


def mask_files_for(images: Sequence[Path], mask_dir: str | Path) -> list[Path]:
    """The mask file for each image: same stem, any image suffix, in ``mask_dir``."""
    mask_dir = Path(mask_dir)
    found = []
    for image in images:
        candidates = [mask_dir / f"{image.stem}{s}" for s in IMAGE_SUFFIXES]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise DataError(f"{mask_dir}: no mask for {image.name} (expected {image.stem}.png); "
                            "add it or drop --reference-masks")
        found.append(hit)
    return found


def load_segmenter(spec: str) -> Segmenter:
    """Import a segmenter given as ``package.module:function`` (a callable image -> mask)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"--segmenter {spec!r}: write it as 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--segmenter {spec!r}: cannot import ({exc}); check the module path") from None
    if not callable(fn):
        raise ConfigError(f"--segmenter {spec!r} is not callable; point it at a function image -> mask")
    return fn
