"""Loading a model to evaluate, and generating the images, with stock diffusers calls only.

``model`` may be:

* a diffusers pipeline folder (``model_index.json``) or a hub id — ``DiffusionPipeline.from_pretrained``;
* a trained output or checkpoint folder holding ``config.yaml`` and adapter files: its base model
  (``model.pretrained`` in ``config.yaml``) is loaded, then ``pytorch_lora_weights.safetensors``
  (``load_lora_weights``) and/or ``learned_embeds.safetensors`` (``load_textual_inversion``).

Sampling follows the paper (Appendix N): DDIM, 50 steps, guidance 7.5. DDPM-family schedulers are
swapped with ``DDIMScheduler.from_config``; flow-matching models (FLUX, SD3) keep their own sampler,
for which DDIM is undefined.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError

__all__ = ["ADAPTER_FILES", "LORA_FILE", "TI_FILE", "generate", "load_adapters", "load_pipeline", "read_run_config", "set_scheduler"]

LORA_FILE = "pytorch_lora_weights.safetensors"
TI_FILE = "learned_embeds.safetensors"
ADAPTER_FILES = (LORA_FILE, TI_FILE)
CONFIG_FILE = "config.yaml"
SCHEDULERS = ("ddim", "default")


def read_run_config(folder: str | Path) -> dict:
    """The resolved training config saved beside a trained output (``config.yaml``); {} when absent."""
    import yaml

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix or remove it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections")
    return data


def _has_adapters(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ADAPTER_FILES)


def base_model_of(folder: str | Path) -> str:
    """``model.pretrained`` of the run's ``config.yaml``."""
    config = read_run_config(folder)
    base = (config.get("model") or {}).get("pretrained") if isinstance(config.get("model"), dict) else None
    if not base:
        raise ConfigError(f"{Path(folder) / CONFIG_FILE}: no model.pretrained; pass the base model with --base-model")
    return str(base)


def set_scheduler(pipe, scheduler: str = "ddim"):
    """Swap a DDPM-family scheduler for DDIM (from its own config); leave flow-matching ones alone."""
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if scheduler == "ddim" and "FlowMatch" not in type(pipe.scheduler).__name__:
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def load_adapters(pipe, adapter_dir: str | Path) -> list[str]:
    """Load LoRA and/or textual-inversion files from ``adapter_dir`` into ``pipe``; returns what was loaded."""
    adapter_dir = Path(adapter_dir)
    loaded = []
    try:
        if (adapter_dir / LORA_FILE).is_file():
            pipe.load_lora_weights(str(adapter_dir), weight_name=LORA_FILE)
            loaded.append(LORA_FILE)
        if (adapter_dir / TI_FILE).is_file():
            pipe.load_textual_inversion(str(adapter_dir / TI_FILE))
            loaded.append(TI_FILE)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"{adapter_dir}: cannot load adapter ({first}); was it trained on this base model?") from None
    if not loaded:
        raise ModelLoadError(f"{adapter_dir}: no {' or '.join(ADAPTER_FILES)} found; point at a trained output or checkpoint folder")
    return loaded


def unload_adapters(pipe, loaded: list[str]) -> None:
    """Undo :func:`load_adapters` so the next checkpoint can be loaded into the same pipeline."""
    if LORA_FILE in loaded:
        pipe.unload_lora_weights()
    if TI_FILE in loaded:
        pipe.unload_textual_inversion()


def load_pipeline(
    model: str | Path,
    adapter_dir: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    base_model: str | None = None,
    scheduler: str = "ddim",
):
    """A ready-to-sample diffusers pipeline for a pipeline folder, hub id or trained output folder."""
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file():
        if not _has_adapters(path):
            raise ModelLoadError(
                f"{path}: neither a diffusers pipeline (model_index.json) nor a trained output ({' / '.join(ADAPTER_FILES)})"
            )
        adapter_dir = adapter_dir or path
        model = base_model or base_model_of(path)
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(model), **kwargs)
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(
            f"cannot load pipeline {str(model)!r} ({first}); offline? pass a local diffusers folder (save_pretrained layout)"
        ) from None
    if hasattr(pipe, "safety_checker") and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # it blanks images, which would corrupt the scores
    set_scheduler(pipe, scheduler)
    if adapter_dir is not None:
        pipe.adapters_loaded = load_adapters(pipe, adapter_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


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
