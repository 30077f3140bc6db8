"""Validation sample grids written during training (PNG, and to TensorBoard or wandb when it is on)."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["fill_prompt", "image_grid", "write_validation_grid"]


def fill_prompt(prompt: str, config) -> str:
    return prompt.replace("{trigger}", config.data.trigger).replace("{class_noun}", config.data.class_noun)


def image_grid(images, rows: int, cols: int):
    from PIL import Image

    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def write_validation_grid(config, backbone, path: Path, accelerator=None, images_per_prompt: int = 2) -> Path:
    """One row per validation prompt, seeded so that grids of different steps are comparable."""
    t = config.train
    prompts = ([fill_prompt(p, config) for p in t.validation_prompts]
               or [f"a {config.data.trigger} {config.data.class_noun}"])
    pipe = backbone.pipeline()
    images = []
    autocast = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast:
        for i, prompt in enumerate(prompts):
            gen = torch.Generator().manual_seed(t.seed + i)
            out = pipe(prompt, num_inference_steps=t.validation_steps, guidance_scale=t.validation_guidance,
                       num_images_per_prompt=images_per_prompt, generator=gen, height=config.data.resolution,
                       width=config.data.resolution)
            images.extend(out.images)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, rows=len(prompts), cols=images_per_prompt)
    grid.save(path)
    if accelerator is not None:
        import numpy as np

        step = int(path.stem.split("-")[-1])
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                tracker.log_images({"validation": [np.asarray(grid)]}, step=step)
    return path
