"""Loading a model to evaluate, and generating the images, with stock diffusers calls only.

``model`` may be:

* a diffusers pipeline folder (``model_index.json``) or a hub id — ``DiffusionPipeline.from_pretrained``;
* a trained output or checkpoint folder holding ``config.yaml`` and a method's output files: loaded
  by :func:`accord.inference.load_trained` (its base model ``model.pretrained``, then the method's own
  ``load_into``: LoRA, textual inversion, Custom Diffusion, DreamBooth; SD and SDXL).

Sampling follows the paper (Appendix N): DDIM, 50 steps, guidance 7.5. DDPM-family schedulers are
swapped with ``DDIMScheduler.from_config``; flow-matching models (FLUX, SD3) keep their own sampler,
for which DDIM is undefined.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..inference import apply_trained, load_base, load_trained, read_run_config, remove_trained

__all__ = ["generate", "load_adapters", "load_pipeline", "prepare", "read_run_config", "set_scheduler",
           "unload_adapters"]

SCHEDULERS = ("ddim", "default")


def set_scheduler(pipe, scheduler: str = "ddim"):
    """Swap a DDPM-family scheduler for DDIM (from its own config); leave flow-matching ones alone."""
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if scheduler == "ddim" and "FlowMatch" not in type(pipe.scheduler).__name__:
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def prepare(pipe, device: str = "cpu", dtype: torch.dtype | None = None, scheduler: str = "ddim"):
    """Eval's settings on a loaded pipeline: no safety checker (it blanks images, which would corrupt
    the scores), the sampler (:func:`set_scheduler`), no progress bar, ``device``/``dtype``."""
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype) if dtype is not None else pipe.to(device)


def load_adapters(pipe, adapter_dir: str | Path, config: dict | None = None):
    """Apply the trained output in ``adapter_dir`` to ``pipe`` (:func:`accord.inference.apply_trained`;
    ``config``: the run's, for a folder without its own ``config.yaml``); returns the method class,
    for :func:`unload_adapters`."""
    return apply_trained(pipe, adapter_dir, config)


def unload_adapters(pipe, method) -> bool:
    """Undo :func:`load_adapters`; ``False`` where the method cannot (load the base pipeline again)."""
    return remove_trained(pipe, method)


def load_pipeline(
    model: str | Path,
    adapter_dir: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
    scheduler: str = "ddim",
):
    """A ready-to-sample pipeline for a pipeline folder, hub id or trained output folder; with
    ``adapter_dir``, ``model`` is the base (a run folder or pipeline) and ``adapter_dir`` is applied."""
    if adapter_dir is None:
        pipe = load_trained(model, dtype=dtype, base_model=base_model)
    else:
        pipe = load_base(model, base_model=base_model, dtype=dtype)
        load_adapters(pipe, adapter_dir, read_run_config(model) if Path(model).is_dir() else None)
    return prepare(pipe, device, dtype, scheduler)


@torch.no_grad()
def generate(
    pipe,
    prompt: str,
    num_images: int = 1,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
):
    """``num_images`` PIL images for one prompt; image k uses seed ``seed + k`` (same seeds for every prompt)."""
    device = getattr(pipe, "device", torch.device("cpu"))
    gen_device = "cpu" if device.type == "mps" else device
    generators = [torch.Generator(gen_device).manual_seed(seed + k) for k in range(num_images)]
    kwargs = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    out = pipe(
        prompt=[prompt] * num_images,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators,
        output_type="pil",
        **kwargs,
    )
    return out.images
