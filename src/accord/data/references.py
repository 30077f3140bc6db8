"""Reference folders: find the photos, their captions (split into ``c_p`` / ``c_g``) and masks.

A reference folder holds images (``.jpg .jpeg .png .webp .bmp``, any case; names starting with
``.`` are ignored) and their captions, given either as

* ``.txt`` sidecars with the image's stem (``00.jpg`` → ``00.txt``), or
* a ``metadata.jsonl`` with one JSON object per line::

      {"file_name": "00.jpg", "caption": "a sks backpack, girl, park",
       "general": ["girl", "park"], "mask": "masks/00.png"}

  ``file_name`` (relative to the folder) is required; ``caption``, ``general`` (an explicit ``c_g``:
  a string or a list of phrases) and ``mask`` (a path relative to the folder) are optional.
  Multi-subject methods (Break-A-Scene) read ``masks``, one mask per subject token::

      {"file_name": "scene.png", "masks": {"<asset0>": "m0.png", "<asset1>": "m1.png"}}

  Files named as masks are not used as references. Masks can also come from a separate folder
  (``mask_dir``, kohya's layout): the mask of ``00.jpg`` is the image file of ``mask_dir`` with stem ``00``
  (``00.png``, ``00.jpg``, …); a mask given both ways is an error. White (255) is inside the mask. Other
  keys are rejected so that a typo is not silently
  ignored. A caption given both as a sidecar and in ``metadata.jsonl`` must agree.

Images without a caption get ``default_caption(trigger, class_noun)`` and one warning lists them.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from ..errors import ConfigError, DataError
from .captions import (
    default_caption,
    join_phrases,
    normalize_caption,
    split_caption,
    split_phrases,
    trigger_pattern,
    vary_caption,
)
from .images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    assign_bucket,
    image_size,
    load_mask,
    load_rgb,
    plan_resize_and_crop,
)

__all__ = [
    "BucketBatchSampler",
    "METADATA_FILE",
    "ReferenceDataset",
    "ReferenceItem",
    "augmentation_generator",
    "collate_references",
    "fingerprint_changes",
    "list_images",
    "reference_fingerprint",
    "scan_references",
    "subject_tokens",
    "declared_masks",
]

METADATA_FILE = "metadata.jsonl"
_METADATA_KEYS = ("file_name", "caption", "general", "mask", "masks")
_BAD_IMAGE_MODES = ("error", "skip")


@dataclass
class ReferenceItem:
    """One reference photo: its caption and that caption's personal (``c_p``) and general (``c_g``) parts."""

    path: Path
    caption: str
    personal: str
    general: str
    mask_path: Path | None = None
    size: tuple[int, int] | None = None  # (width, height) after EXIF rotation; filled by scan_references
    masks: dict[str, Path] | None = None  # per-subject masks {token: path} (metadata ``masks``)
    weight: float = 1.0  # loss weight of its samples (data.instance_dirs' per-folder weight)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _check_folder(folder, what: str = "reference folder") -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{what} {folder} does not exist; pass the folder that holds the images")
    if not folder.is_dir():
        raise DataError(f"{what} {folder} is not a folder; pass the folder that holds the images, not a file")
    return folder


@dataclass
class _Meta:
    line: int
    caption: str | None = None
    general: str | None = None
    mask: Path | None = None
    masks: dict[str, Path] | None = None


def _natural_key(token: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", token)]


def subject_tokens(masks: Sequence[dict | None]) -> list[str]:
    """The subject tokens named by per-image ``masks`` dicts, in natural order (``<asset2>`` before ``<asset10>``)."""
    return sorted({t for m in masks if m for t in m}, key=_natural_key)


def read_subject_tokens(folder) -> list[str]:
    """The subject tokens of a reference folder's ``metadata.jsonl`` (no image is decoded)."""
    return subject_tokens([e.masks for e in _read_metadata(_check_folder(folder)).values()])


def _read_metadata(folder: Path) -> dict[Path, _Meta]:
    """``metadata.jsonl`` → {resolved image path: entry}; every problem names the file and the line."""
    meta_path = folder / METADATA_FILE
    entries: dict[Path, _Meta] = {}
    if not meta_path.is_file():
        return entries
    try:
        lines = meta_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{meta_path}: not UTF-8 text ({e}); save it as UTF-8") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{meta_path}, line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object like {{\"file_name\": ..., \"caption\": ...}}")
        unknown = sorted(set(record) - set(_METADATA_KEYS))
        if unknown:
            raise DataError(
                f"{where}: unknown key(s) {', '.join(unknown)}; allowed keys are {', '.join(_METADATA_KEYS)}"
            )
        name = record.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: missing \"file_name\"; name the image this line describes")
        path = folder / name
        if not path.is_file():
            raise DataError(f"{where}: file_name {name!r} not found in {folder}; fix the name or add the image")
        path = path.resolve()
        if path in entries:
            first = entries[path].line
            raise DataError(f"{where}: {name!r} is already described on line {first}; keep one line per image")
        entry = _Meta(line=n)
        caption = record.get("caption")
        if caption is not None:
            if not isinstance(caption, str):
                raise DataError(f"{where}: \"caption\" must be a string, got {type(caption).__name__}")
            entry.caption = normalize_caption(caption) or None
        general = record.get("general")
        if general is not None:
            if isinstance(general, str):
                entry.general = normalize_caption(general)
            elif isinstance(general, list) and all(isinstance(g, str) for g in general):
                entry.general = join_phrases(p for g in general for p in split_phrases(g))
            else:
                raise DataError(f"{where}: \"general\" must be a string or a list of strings")
        mask = record.get("mask")
        if mask is not None:
            if not isinstance(mask, str) or not (folder / mask).is_file():
                raise DataError(f"{where}: mask {mask!r} not found in {folder}; fix the path or drop \"mask\"")
            entry.mask = (folder / mask).resolve()
        masks = record.get("masks")
        if masks is not None:
            if not isinstance(masks, dict) or not masks or not all(
                    isinstance(k, str) and k.strip() and isinstance(v, str) for k, v in masks.items()):
                raise DataError(f"{where}: \"masks\" must map subject tokens to mask files, e.g. "
                                "{\"<asset0>\": \"m0.png\", \"<asset1>\": \"m1.png\"}")
            for token, m in masks.items():
                if not (folder / m).is_file():
                    raise DataError(f"{where}: mask {m!r} of {token} not found in {folder}; fix the path")
            entry.masks = {k.strip(): (folder / v).resolve() for k, v in masks.items()}
        entries[path] = entry
    return entries


def _mask_dir_masks(folder: Path, mask_dir) -> dict[str, Path]:
    """{image stem: mask file} of ``mask_dir`` (kohya's same-name masks); one mask per stem."""
    if mask_dir is None:
        return {}
    masks_folder = _check_folder(mask_dir, "data.mask_dir")
    if masks_folder.resolve() == folder.resolve():
        raise DataError(f"data.mask_dir={mask_dir} is the reference folder itself; "
                        "put the masks in a folder of their own")
    out: dict[str, Path] = {}
    for path in list_images(masks_folder):
        if path.stem in out:
            raise DataError(f"data.mask_dir={mask_dir}: two masks for {path.stem!r} "
                            f"({out[path.stem].name}, {path.name}); keep one per image")
        out[path.stem] = path.resolve()
    return out


def declared_masks(folder, mask_dir=None) -> dict[Path, Path]:
    """{image: mask} of every reference image that has a single-subject mask (metadata.jsonl ``mask`` or a
    same-name file in ``mask_dir``), read without decoding an image: for the checks made before training."""
    folder = _check_folder(folder)
    meta = _read_metadata(folder)
    out = {p: e.mask for p, e in meta.items() if e.mask is not None}
    by_stem = _mask_dir_masks(folder, mask_dir)
    taken = ({e.mask for e in meta.values() if e.mask is not None}
             | {m for e in meta.values() if e.masks for m in e.masks.values()})
    for image in [p.resolve() for p in list_images(folder)] + list(meta):
        if image in taken:
            continue
        mask = by_stem.get(image.stem)
        if mask is None:
            continue
        if image in out and out[image] != mask:
            raise DataError(f"{image.name}: mask given both in {folder / METADATA_FILE} line {meta[image].line} and in "
                            f"data.mask_dir ({mask.name}); keep one of them")
        out[image] = mask
    return out


def _read_sidecar(txt: Path) -> str | None:
    try:
        text = txt.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{txt}: caption is not UTF-8 text ({e}); save it as UTF-8") from None
    return normalize_caption(text) or None


def scan_references(
    folder,
    trigger: str,
    class_noun: str,
    *,
    on_bad_image: str = "error",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    mask_dir=None,
) -> list[ReferenceItem]:
    """Find the reference images in ``folder`` with their captions, ``c_p``/``c_g`` and masks.

    ``mask_dir``: a folder of kohya-style same-name masks (see the module docstring) beside metadata.jsonl's.

    Every image (and mask) is decoded once to check it. ``on_bad_image="error"`` raises a
    :class:`DataError` naming the first bad file; ``"skip"`` drops bad images and warns once,
    listing every skipped file and why. Captions are validated after skipping: all captions
    that lack ``trigger`` are named in one :class:`DataError`.
    """
    if on_bad_image not in _BAD_IMAGE_MODES:
        raise ConfigError(f"on_bad_image={on_bad_image!r} is not one of {', '.join(map(repr, _BAD_IMAGE_MODES))}")
    trigger_pattern(trigger)  # a bad trigger is a ConfigError before any image is decoded
    folder = _check_folder(folder)
    meta = _read_metadata(folder)
    if mask_dir is not None:
        for image, mask in declared_masks(folder, mask_dir).items():
            meta.setdefault(image, _Meta(line=0)).mask = mask
    masks = {e.mask for e in meta.values() if e.mask is not None}
    masks |= {m for e in meta.values() if e.masks for m in e.masks.values()}
    images = [p for p in list_images(folder) if p.resolve() not in masks]
    images += sorted(p for p in meta if p not in {q.resolve() for q in images} and p not in masks)
    if not images:
        raise DataError(
            f"reference folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}); put your photos there"
        )

    # 1. decode every image (and mask) once: bad ones raise or are skipped
    good: list[tuple[Path, tuple[int, int]]] = []
    skipped: list[str] = []
    for path in images:
        entry = meta.get(path.resolve())
        try:
            size = load_rgb(path, max_pixels).size
            mask_paths = [] if entry is None else [entry.mask] + list((entry.masks or {}).values())
            for mask_path in (m for m in mask_paths if m is not None):
                msize = load_mask(mask_path, max_pixels).size
                if msize != size:
                    raise DataError(
                        f"{mask_path}: mask is {msize[0]}x{msize[1]} but its image {path.name} is "
                        f"{size[0]}x{size[1]}; save the mask at the image's size"
                    )
        except DataError as e:
            if on_bad_image == "error":
                raise
            skipped.append(str(e))
            continue
        good.append((path, size))
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} bad reference image(s) in {folder}: " + "; ".join(skipped),
            UserWarning,
            stacklevel=2,
        )
    if not good:
        raise DataError(f"reference folder {folder} has no usable images (all were skipped); fix or replace them")

    # 2. captions: metadata.jsonl and/or .txt sidecar, else the default caption
    items: list[ReferenceItem] = []
    uncaptioned: list[str] = []
    no_trigger: list[str] = []
    for path, size in good:
        entry = meta.get(path.resolve())
        txt = path.with_suffix(".txt")
        sidecar = _read_sidecar(txt) if txt.is_file() else None
        meta_caption = entry.caption if entry is not None else None
        if sidecar is not None and meta_caption is not None and sidecar != meta_caption:
            raise DataError(
                f"{path}: caption differs between {txt.name} and {METADATA_FILE} line {entry.line}; keep one of them"
            )
        caption = meta_caption or sidecar
        source = f"{folder / METADATA_FILE} line {entry.line}" if meta_caption else str(txt)
        if caption is None:
            caption = default_caption(trigger, class_noun)
            uncaptioned.append(path.name)
        try:
            personal, general = split_caption(caption, trigger)
        except DataError:
            no_trigger.append(source)
            continue
        if entry is not None and entry.general is not None:
            general = entry.general
        mask = entry.mask if entry is not None else None
        items.append(ReferenceItem(path, caption, personal, general, mask, size, entry.masks if entry else None))
    if no_trigger:
        raise DataError(
            f"caption(s) without the trigger {trigger.strip()!r}: {', '.join(no_trigger)}; "
            f"add {trigger.strip()!r} to each caption or set trigger to the word they use"
        )
    if uncaptioned:
        warnings.warn(
            f"{len(uncaptioned)} reference image(s) in {folder} have no caption, using "
            f"{default_caption(trigger, class_noun)!r}: {', '.join(uncaptioned)}; add .txt sidecars or "
            f"{METADATA_FILE} that describe each photo's context (c_g) so ACCORD has something to decouple",
            UserWarning,
            stacklevel=2,
        )
    _check_class_noun(items, class_noun, folder)
    return items


def _check_class_noun(items: list[ReferenceItem], class_noun: str, folder: Path) -> None:
    """Warn when no caption names the class noun: likely one kept from an example config (a dog as 'backpack')."""
    words = class_noun.split()
    noun = r"\s+".join(map(re.escape, words))
    pattern = re.compile(rf"(?<!\w){noun}(?:e?s)?(?!\w)", re.IGNORECASE)
    if words and items and not any(pattern.search(item.caption) for item in items):
        warnings.warn(
            f"data.class_noun={' '.join(words)!r} is in none of the {len(items)} captions in {folder} (e.g. "
            f"{items[0].caption!r}); it is the subject's superclass (PDLoss, class images, new tokens' initial "
            "embedding): set it to what the photos show, or name it in the captions",
            UserWarning,
            stacklevel=3,
        )


def reference_fingerprint(items: Sequence[ReferenceItem], folder) -> dict[str, dict]:
    """{name relative to ``folder``: size in bytes, content hash, caption} of each reference, kept in checkpoints so a
    resume can tell that the photos changed."""
    root = Path(folder).resolve()
    out = {}
    for item in items:
        path = item.path.resolve()
        data = path.read_bytes()
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        out[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16], "caption": item.caption}
    return out


def fingerprint_changes(saved: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """What differs between two :func:`reference_fingerprint` results, one phrase per file, e.g. ``02.jpg: removed``."""
    changes = []
    for name in sorted(set(saved) | set(now), key=_natural_key):
        a, b = saved.get(name), now.get(name)
        if a is None:
            changes.append(f"{name}: added")
        elif b is None:
            changes.append(f"{name}: removed")
        elif (a["bytes"], a["sha256"]) != (b["bytes"], b["sha256"]):
            changes.append(f"{name}: content changed ({a['bytes']} -> {b['bytes']} bytes)")
        elif a["caption"] != b["caption"]:
            changes.append(f"{name}: caption changed ({a['caption']!r} -> {b['caption']!r})")
    return changes


# ---- dataset -------------------------------------------------------------------------------------


def augmentation_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A ``torch.Generator`` that depends only on ``(seed, epoch, index)``.

    Seeds are mixed with NumPy's ``SeedSequence`` so that neighbouring triples give unrelated
    streams; a resumed run therefore sees exactly the crops and flips of an uninterrupted one.
    """
    return _mixed_generator(0, seed, epoch, index)


def _mixed_generator(*keys: int) -> torch.Generator:
    state = np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class ReferenceDataset(torch.utils.data.Dataset):
    """Reference photos as training samples.

    ``__getitem__`` returns a dict with

    * ``pixel_values``: float32 ``[3, H, W]`` in ``[-1, 1]``;
    * ``caption``, ``personal`` (``c_p``), ``general`` (``c_g``): strings;
    * ``index``: the item's index;
    * ``original_size`` ``(h, w)`` and ``crop_top_left`` ``(top, left)``: int64 ``[2]`` tensors, the
      SDXL size conditioning (the crop is given in the resized, flipped frame);
    * ``mask``: float32 ``[1, H, W]`` in ``[0, 1]`` — **present only when at least one item has a
      mask**; items without one then get an all-ones mask, so every sample has the same keys and
      batches always collate;
    * ``subject_masks`` float32 ``[S, 1, H, W]`` and ``subject_present`` bool ``[S]`` — **present only when
      an item has per-subject ``masks``**: one slot per token of :attr:`subject_tokens` (all items'
      tokens, natural order); a subject absent from an image has an all-zero mask and ``False``.

    Augmentation: ``center_crop=False`` crops at random, ``random_flip`` flips horizontally with
    probability ½; both draw from :func:`augmentation_generator` ``(seed, epoch, index)``, so the
    sample depends only on those three numbers. Call :meth:`set_epoch` before each epoch (before
    the DataLoader iterator is created; with ``persistent_workers=True`` workers keep the old epoch).

    With ``buckets`` (see :func:`~accord.data.images.make_buckets`) each image is resized to its
    aspect-ratio bucket instead of ``resolution``; batch with :class:`BucketBatchSampler`.

    ``cache=True`` keeps each image decoded and resized (before the random crop, so samples are
    bitwise the same as without the cache): a few-shot set decodes its photos once per worker.

    Captions: ``caption_dropout``, ``shuffle_phrases`` and ``keep_phrases`` (:func:`~accord.data.captions.vary_caption`)
    draw from their own generator of ``(seed, epoch, index)``, so the crops and flips stay what they were and a
    resumed run sees the same captions; with dropout on, samples carry ``caption_dropped`` (bool). Items with a
    ``weight`` other than 1 give every sample a ``loss_weight`` (float).
    """

    def __init__(
        self,
        items: Sequence[ReferenceItem],
        resolution: int,
        *,
        center_crop: bool = True,
        random_flip: bool = False,
        buckets: Sequence[tuple[int, int]] | None = None,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache: bool = True,
        caption_dropout: float = 0.0,
        shuffle_phrases: bool = False,
        keep_phrases: int = 0,
    ):
        if not items:
            raise DataError("no reference images given; point the dataset at a folder with photos")
        if not isinstance(resolution, int) or resolution <= 0:
            raise ConfigError(f"resolution must be a positive integer, got {resolution!r}")
        self.items = list(items)
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels
        self.cache = cache
        self.caption_dropout, self.shuffle_phrases, self.keep_phrases = caption_dropout, shuffle_phrases, keep_phrases
        self.weighted = any(it.weight != 1.0 for it in self.items)
        self._cache: dict[int, tuple] = {}
        self.has_masks = any(it.mask_path is not None for it in self.items)
        self.subject_tokens = subject_tokens([it.masks for it in self.items])
        self.buckets = list(buckets) if buckets else None
        if self.buckets:
            sizes = [it.size or image_size(it.path, max_pixels) for it in self.items]
            self.target_sizes = [assign_bucket(w, h, self.buckets) for w, h in sizes]
        else:
            self.target_sizes = [(resolution, resolution)] * len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _resized(self, index: int):
        """``(image, mask or None, (orig_h, orig_w))`` resized to cover the target: no randomness, so cacheable."""
        if index in self._cache:
            return self._cache[index][:3]
        return self._resized_all(index)[:3]

    def _resized_all(self, index: int):
        """:meth:`_resized` plus the per-subject masks ``{token: mask}`` (resized the same way)."""
        if index in self._cache:
            return self._cache[index]
        item = self.items[index]
        img = load_rgb(item.path, self.max_pixels)
        original = (img.height, img.width)
        (rw, rh), _ = plan_resize_and_crop(img.width, img.height, self.target_sizes[index])
        mask = None
        if item.mask_path is not None:
            mask = load_mask(item.mask_path, self.max_pixels)
            if mask.size != img.size:
                raise DataError(f"{item.mask_path}: mask is {mask.width}x{mask.height} but its image {item.path.name} "
                                f"is {img.width}x{img.height}; save the mask at the image's size")
            mask = mask.resize((rw, rh), Image.BILINEAR) if mask.size != (rw, rh) else mask
        subjects = {}
        for token, path in (item.masks or {}).items():
            m = load_mask(path, self.max_pixels)
            if m.size != img.size:
                raise DataError(f"{path}: mask is {m.width}x{m.height} but its image {item.path.name} "
                                f"is {img.width}x{img.height}; save the mask at the image's size")
            subjects[token] = m.resize((rw, rh), Image.BILINEAR) if m.size != (rw, rh) else m
        img = img.resize((rw, rh), Image.LANCZOS) if img.size != (rw, rh) else img
        if self.cache:
            self._cache[index] = (img, mask, original, subjects)
        return img, mask, original, subjects

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        img, mask, (orig_h, orig_w), subjects = self._resized_all(index)
        tw, th = self.target_sizes[index]
        # the resized size does not depend on the generator, so cached and fresh images give the same crop
        gen = augmentation_generator(self.seed, self.epoch, index)
        (rw, rh), (top, left) = plan_resize_and_crop(orig_w, orig_h, (tw, th), self.center_crop, gen)
        flip = self.random_flip and bool(torch.rand((), generator=gen) < 0.5)

        def crop_flip(im: Image.Image) -> Image.Image:
            im = im.crop((left, top, left + tw, top + th))
            return im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im

        caption, personal, general, dropped = item.caption, item.personal, item.general, False
        if self.caption_dropout > 0 or self.shuffle_phrases:
            caption, personal, general, dropped = vary_caption(
                caption, personal, general, _mixed_generator(2, self.seed, self.epoch, index),
                dropout=self.caption_dropout, shuffle=self.shuffle_phrases, keep=self.keep_phrases)
        sample = {
            "pixel_values": pil_to_tensor(crop_flip(img)).float().div(127.5).sub(1.0),
            "caption": caption,
            "personal": personal,
            "general": general,
            "index": index,
            "original_size": torch.tensor([orig_h, orig_w]),
            "crop_top_left": torch.tensor([top, rw - left - tw if flip else left]),
        }
        if self.caption_dropout > 0:
            sample["caption_dropped"] = torch.tensor(dropped)
        if self.weighted:
            sample["loss_weight"] = torch.tensor(float(item.weight))
        if self.has_masks:
            if mask is None:
                sample["mask"] = torch.ones(1, th, tw)
            else:
                sample["mask"] = pil_to_tensor(crop_flip(mask)).float().div(255.0)
        if self.subject_tokens:
            zero = torch.zeros(1, th, tw)
            sample["subject_masks"] = torch.stack([pil_to_tensor(crop_flip(subjects[t])).float().div(255.0)
                                                   if t in subjects else zero for t in self.subject_tokens])
            sample["subject_present"] = torch.tensor([t in subjects for t in self.subject_tokens])
        return sample


def collate_references(batch: Sequence[dict]) -> dict:
    """Stack tensors and keep strings as lists; ``index`` becomes an int64 tensor.

    All samples must have the same size: with buckets, batch with :class:`BucketBatchSampler`.
    """
    if not batch:
        raise ValueError("collate_references got an empty batch")
    shapes = {tuple(s["pixel_values"].shape) for s in batch}
    if len(shapes) > 1:
        raise ValueError(
            f"samples of different sizes {sorted(shapes)} in one batch; use BucketBatchSampler with buckets"
        )
    out: dict = {}
    for key in batch[0]:
        values = [s[key] for s in batch]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = list(values)
    return out


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of indices that share a bucket size; the order depends only on ``(seed, epoch)``.

    Takes ``dataset.target_sizes`` (or any list of sizes). Call :meth:`set_epoch` each epoch.
    """

    def __init__(
        self, dataset_or_sizes, batch_size: int, *, shuffle: bool = True, drop_last: bool = False, seed: int = 0
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
        sizes = getattr(dataset_or_sizes, "target_sizes", dataset_or_sizes)
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(sizes):
            self.groups.setdefault(tuple(s), []).append(i)
        self.batch_size, self.shuffle, self.drop_last, self.seed, self.epoch = batch_size, shuffle, drop_last, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[list[int]]:
        gen = _mixed_generator(1, self.seed, self.epoch)
        batches = []
        for key in sorted(self.groups):
            idx = self.groups[key]
            if self.shuffle:
                idx = [idx[i] for i in torch.randperm(len(idx), generator=gen).tolist()]
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
