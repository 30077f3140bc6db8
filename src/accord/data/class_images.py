"""Class images for prior preservation (DreamBooth, Ruiz et al. 2023, Sec. 3.3): load or generate them.

Generated images are named ``class_00000.png`` … and written atomically (hidden temporary file +
``os.replace``), so the folder is a cache: an interrupted run is resumed by calling
:func:`generate_class_images` again, which only produces what is missing. Image ``i`` is always
drawn from the same seed (derived from ``(seed, i)``), whatever the batch size or process count.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError, DataError
from .captions import normalize_caption
from .images import DEFAULT_MAX_PIXELS, _atomic_save, image_size
from .references import ReferenceDataset, ReferenceItem, _check_folder, _mixed_generator, list_images

__all__ = ["ClassImages", "class_image_path", "class_image_seed", "generate_class_images"]

_CLASS_NAME = re.compile(r"^class_(\d+)\.png$")


def class_image_path(folder, index: int) -> Path:
    return Path(folder) / f"class_{index:05d}.png"


def class_image_seed(seed: int, index: int) -> int:
    """The seed of class image ``index``; depends only on ``(seed, index)``."""
    return int(_mixed_generator(2, seed, index).initial_seed())


class ClassImages(ReferenceDataset):
    """The first ``num_images`` images of ``folder`` (sorted by name), each captioned with ``class_prompt``.

    Samples look like :class:`ReferenceDataset`'s; the class prompt holds no trigger, so
    ``personal`` is ``""`` and ``general`` is the whole prompt. Image headers are read up front;
    a file that fails to decode raises :class:`DataError` naming it when its sample is loaded.
    ``cache`` is off by default: class sets hold hundreds of images.
    """

    def __init__(
        self,
        folder,
        class_prompt: str,
        resolution: int,
        *,
        num_images: int | None = None,
        center_crop: bool = True,
        random_flip: bool = False,
        buckets=None,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache: bool = False,
    ):
        folder = _check_folder(folder, "class image folder")
        prompt = normalize_caption(class_prompt or "")
        if not prompt:
            raise ConfigError("class_prompt is empty; set it to e.g. 'a backpack'")
        paths = list_images(folder)
        if num_images is not None:
            if len(paths) < num_images:
                raise DataError(
                    f"class image folder {folder} has {len(paths)} images but {num_images} are needed; "
                    "run generate_class_images first or lower the number of class images"
                )
            paths = paths[:num_images]
        if not paths:
            raise DataError(f"class image folder {folder} has no images; run generate_class_images first")
        items = [ReferenceItem(p, prompt, "", prompt, None, image_size(p, max_pixels)) for p in paths]
        super().__init__(
            items, resolution, center_crop=center_crop, random_flip=random_flip, buckets=buckets, seed=seed,
            max_pixels=max_pixels, cache=cache,
        )
        self.folder = folder
        self.class_prompt = prompt


def _plan(folder: Path, num_images: int) -> list[int]:
    """Indices still to generate: every image already in the folder counts toward ``num_images``."""
    existing = list_images(folder)
    present = {int(m.group(1)) for p in existing if (m := _CLASS_NAME.match(p.name))}
    need = num_images - len(existing)
    missing, i = [], 0
    while len(missing) < need:
        if i not in present:
            missing.append(i)
        i += 1
    return missing


def generate_class_images(
    pipeline_factory,
    class_prompt: str,
    folder,
    num_images: int,
    *,
    batch_size: int = 4,
    seed: int = 0,
    num_inference_steps: int = 30,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    pipeline_kwargs: dict | None = None,
    accelerator=None,
    progress: bool = True,
) -> list[Path]:
    """Fill ``folder`` up to ``num_images`` images of ``class_prompt``; return the files this process wrote.

    ``pipeline_factory()`` builds a diffusers pipeline and is called only if this process has
    images to make. With an ``accelerate.PartialState`` or ``Accelerator`` each process takes every
    ``num_processes``-th missing index; all processes must see the same folder (shared
    filesystem). They plan first, wait for each other, generate, and wait again, so every process
    returns with the folder complete. The progress bar shows the main process's share.
    """
    if num_images < 0 or batch_size < 1:
        raise ConfigError(f"need num_images ≥ 0 and batch_size ≥ 1, got {num_images} and {batch_size}")
    prompt = normalize_caption(class_prompt or "")
    if not prompt:
        raise ConfigError("class_prompt is empty; set it to e.g. 'a backpack'")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"class image folder {folder} is a file; pass a folder")
    folder.mkdir(parents=True, exist_ok=True)

    rank = getattr(accelerator, "process_index", 0)
    world = getattr(accelerator, "num_processes", 1)
    is_main = getattr(accelerator, "is_main_process", True)
    mine = _plan(folder, num_images)[rank::world]
    if accelerator is not None:
        accelerator.wait_for_everyone()  # nobody writes before everyone has planned

    written: list[Path] = []
    if mine:
        import torch
        from tqdm.auto import tqdm

        pipe = pipeline_factory()
        if accelerator is not None:
            pipe = pipe.to(accelerator.device)
        pipe.set_progress_bar_config(disable=True)
        call = {"num_inference_steps": num_inference_steps, "output_type": "pil", **(pipeline_kwargs or {})}
        for key, value in (("height", height), ("width", width), ("guidance_scale", guidance_scale),
                           ("negative_prompt", negative_prompt)):
            if value is not None:
                call[key] = value
        with tqdm(total=len(mine), desc="class images", disable=not (progress and is_main)) as bar:
            for start in range(0, len(mine), batch_size):
                chunk = mine[start : start + batch_size]
                gens = [torch.Generator().manual_seed(class_image_seed(seed, i)) for i in chunk]
                if "negative_prompt" in call:
                    call["negative_prompt"] = [negative_prompt] * len(chunk)
                with torch.no_grad():
                    images = pipe(prompt=[prompt] * len(chunk), generator=gens, **call).images
                for i, img in zip(chunk, images):
                    path = class_image_path(folder, i)
                    _atomic_save(img.convert("RGB"), path)
                    written.append(path)
                bar.update(len(chunk))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return written
