"""``accord generate``: a base model or a trained output + prompts → images (DDIM 50 steps, CFG 7.5,
the paper's evaluation sampler by default)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import AccordError
from .output import writable_folder

# Each image's generator is seeded with seed * 1_000_003 + ...; torch's generators take 64-bit seeds.
SEED_LIMIT = 2**63 // 1_000_003

__all__ = ["generate", "SEED_LIMIT"]


def generate(source: str, prompts: list[str], output: Path, *, num_images: int = 4, steps: int = 50,
             guidance: float = 7.5, seed: int = 0, height: int | None = None, width: int | None = None,
             scheduler: str = "ddim", device: str | None = None, progress: bool = True) -> list[Path]:
    """Generate ``num_images`` per prompt, seeded per (seed, prompt index, image index); returns the PNG paths."""
    from diffusers import DDIMScheduler
    from tqdm.auto import tqdm

    from .inference import load_trained
    from .validation import image_grid

    if not prompts:
        raise AccordError("no prompts given; use --prompt TEXT (repeatable) or --prompts-file FILE")
    for flag, value in (("--num-images", num_images), ("--steps", steps), ("--height", height), ("--width", width)):
        if value is not None and value < 1:
            raise AccordError(f"{flag} {value}: give a positive number")
    if not 0 <= seed < SEED_LIMIT:
        raise AccordError(f"--seed {seed}: use an integer from 0 to {SEED_LIMIT - 1} (the per-image 64-bit seeds "
                          "are derived from it)")
    writable_folder(output, "--output")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device == "cuda" else None
    pipe = load_trained(source, device=device, dtype=dtype)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    extra = {}
    if Path(source).is_dir():  # a FLUX/SD3 run trained on fewer T5 tokens generates with the same number
        from .inference import read_run_config

        length = (read_run_config(Path(source)).get("model") or {}).get("max_sequence_length")
        if length is not None:
            extra["max_sequence_length"] = int(length)
    written, rows = [], []
    for p_index, prompt in enumerate(tqdm(prompts, desc="accord generate", disable=not progress)):
        row = []
        for i in range(num_images):
            gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + p_index * 1009 + i)
            image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                         height=height, width=width, **extra).images[0]
            slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
            path = output / f"{p_index:03d}-{slug}-{i:02d}.png"
            image.save(path)
            written.append(path)
            row.append(image)
        rows.append(row)
    image_grid([im for row in rows for im in row], rows=len(rows), cols=num_images).save(output / "grid.png")
    return written
