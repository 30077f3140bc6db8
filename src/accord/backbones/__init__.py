"""Backbones: what differs per model family. ``load_backbone`` turns a hub id, a local diffusers
folder or a single ``.safetensors`` file into one, offline-friendly and with one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError, ModelLoadError
from .base import Backbone, Conditioning

__all__ = ["Backbone", "Conditioning", "load_backbone", "detect_family", "FAMILIES", "FLOW_FAMILIES"]

FAMILIES = ("sd", "sdxl", "flux", "sd3")
#: families trained by flow matching (a transformer; velocity prediction; no min-SNR weighting)
FLOW_FAMILIES = ("flux", "sd3")
_PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline",
              "sd3": "StableDiffusion3Pipeline"}


def _offline_hint(source: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if offline:
        return (
            f"model {source!r} is not a local folder or file and is not in the Hugging Face cache, and the hub is "
            "offline (HF_HUB_OFFLINE=1): give model.pretrained as a local diffusers folder, or download it first"
        )
    return f"model {source!r} could not be loaded: check the hub id / path, your network and `huggingface-cli login`"


def detect_family(source: str, revision: str | None = None) -> str:
    """Read the pipeline class from ``model_index.json`` (local or hub) and map it to a family."""
    from diffusers import DiffusionPipeline

    path = Path(source)
    try:
        if path.is_dir():
            index = path / "model_index.json"
            if not index.is_file():
                raise ModelLoadError(
                    f"{path} has no model_index.json; give a diffusers pipeline folder (save_pretrained layout)"
                )
            name = json.loads(index.read_text())["_class_name"]
        else:
            name = DiffusionPipeline.load_config(source, revision=revision)["_class_name"]
    except ModelLoadError:
        raise
    except Exception:
        raise ModelLoadError(_offline_hint(source)) from None
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if "XL" in name:
        return "sdxl"
    if "StableDiffusion" in name and "3" not in name:
        return "sd"
    raise ModelLoadError(
        f"model {source!r} is a {name}; supported families: {', '.join(FAMILIES)} (set model.backbone)"
    )


def _load_pipeline(cls, model_cfg, family: str, quantization=None):
    source = model_cfg.pretrained
    kwargs = {"revision": model_cfg.revision, "variant": model_cfg.variant, "quantization_config": quantization}
    if family == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        if source.endswith((".safetensors", ".ckpt")):
            if source.endswith(".ckpt"):
                raise ModelLoadError(
                    f"{source}: .ckpt files are pickles and are not loaded; convert it to .safetensors"
                )
            if not Path(source).is_file():
                raise ModelLoadError(f"single-file model {source} not found")
            if quantization is not None:
                raise ConfigError(
                    f"model.quantize={model_cfg.quantize} loads through from_pretrained; convert {source} "
                    "to a diffusers folder (or use model.quantize=int8, applied after loading)"
                )
            config = model_cfg.single_file_config
            return cls.from_single_file(source, config=config, **({"safety_checker": None} if family == "sd" else {}))
        return cls.from_pretrained(
            source, **{k: v for k, v in kwargs.items() if v is not None or k == "safety_checker"}
        )
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        if Path(source).exists():
            raise ModelLoadError(
                f"{source}: could not be loaded as a {cls.__name__} ({str(exc).splitlines()[0]})"
            ) from None
        if source.endswith(".safetensors"):
            raise ModelLoadError(
                f"{source}: a single file needs its configs; set model.single_file_config to a local diffusers folder "
                "of the same family (offline the originals cannot be fetched)"
            ) from None
        raise ModelLoadError(_offline_hint(source)) from None


def _pd_projection(name: str | None):
    if not name:
        return None
    from transformers import CLIPTextModelWithProjection

    try:
        model = CLIPTextModelWithProjection.from_pretrained(name)
    except Exception:
        raise ModelLoadError(f"accord.pd_clip: {_offline_hint(name)}") from None
    projection = model.text_projection.requires_grad_(False)
    return projection


def load_backbone(model_cfg, *, resolution: int = 512, pd_clip: str | None = None,
                  compute_dtype=None) -> Backbone:
    """Load the base model named by ``model_cfg`` (:class:`accord.config.ModelConfig`); ``model.quantize=nf4`` is
    applied while loading (computing in ``compute_dtype``), int8 afterwards (:func:`accord.quantize.quantize_frozen`).
    """
    import diffusers
    import torch

    from ..quantize import pipeline_quantization
    from .stable_diffusion import StableDiffusionBackbone, StableDiffusionXLBackbone

    family = model_cfg.backbone
    if family == "auto":
        if model_cfg.pretrained.endswith(".safetensors"):
            raise ConfigError("model.backbone='auto' cannot read a single .safetensors file: set model.backbone to "
                              f"one of {', '.join(FAMILIES)}")
        family = detect_family(model_cfg.pretrained, model_cfg.revision)
    if family not in FAMILIES:
        raise ConfigError(f"model.backbone={family!r} is not supported; choose one of auto, {', '.join(FAMILIES)}")
    quantization = pipeline_quantization(getattr(model_cfg, "quantize", "none"), family, compute_dtype or torch.float32)
    if family in FLOW_FAMILIES:
        if model_cfg.prediction_type is not None:
            raise ConfigError(f"model.prediction_type is for sd/sdxl; {family} predicts flow velocity: set it to null")
        from .flux import FluxBackbone
        from .sd3 import StableDiffusion3Backbone

        pipe = _load_pipeline(getattr(diffusers, _PIPELINES[family]), model_cfg, family, quantization)
        if family == "flux":
            backbone = FluxBackbone(pipe, model_cfg.pretrained, guidance=model_cfg.flux_guidance)
        else:
            backbone = StableDiffusion3Backbone(pipe, model_cfg.pretrained)
        if model_cfg.max_sequence_length is not None:
            limit = 256 if family == "flux" and backbone.guidance is None else 512
            if not 1 <= model_cfg.max_sequence_length <= limit:
                raise ConfigError(f"model.max_sequence_length={model_cfg.max_sequence_length}: this {family} model "
                                  f"takes 1 to {limit} T5 tokens; set a value in that range or null for the default")
            backbone.max_sequence_length = model_cfg.max_sequence_length
        return backbone
    if model_cfg.max_sequence_length is not None:
        raise ConfigError(f"model.max_sequence_length is for flux/sd3 (T5 prompts); {family} reads 77 CLIP tokens: "
                          "set it to null")
    pipe = _load_pipeline(getattr(diffusers, _PIPELINES[family]), model_cfg, family, quantization)
    # Train on the DDPM grid of the model's own schedule (as diffusers' training scripts do).
    noise_scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    if model_cfg.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=model_cfg.prediction_type)
        pipe.scheduler.register_to_config(prediction_type=model_cfg.prediction_type)
    source = model_cfg.pretrained
    if family == "sdxl":
        return StableDiffusionXLBackbone(pipe, noise_scheduler, source, resolution=resolution)
    return StableDiffusionBackbone(pipe, noise_scheduler, source, pd_projection=_pd_projection(pd_clip))
