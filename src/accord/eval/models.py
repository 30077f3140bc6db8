"""Loading the metric backbones by public id or local path, once per process.

Every loader takes a *spec* (a public id, an ``hf-hub:`` id, or a local folder/file) and returns a
small bundle holding the model in eval mode plus what it needs to read images and text. A missing
model (offline, typo, no local copy) raises :class:`~accord.errors.ModelLoadError` with one line
naming the model and how to pass a local copy instead.

Loaded bundles are kept in a small least-recently-used cache (:data:`MAX_CACHED` entries) keyed by
kind, spec and device, so that evaluating many checkpoints or subjects reuses one copy of each
model. :func:`clear_cache` empties it.

Local formats (what ``save_*`` helpers in the tests write, and what users download):

=========  ===================================================================================
CLIP       open_clip folder: ``open_clip_config.json`` + ``open_clip_model.safetensors``
           (``hf-hub:`` layout), or an architecture name plus a weights file as ``pretrained``
DINO       timm folder: ``config.json`` + ``model.safetensors`` (``timm.models.save_for_hf``),
           or a transformers ViT folder (``facebook/dino-vits16`` layout)
BLIP       transformers folder: ``BlipForImageTextRetrieval`` + ``BlipProcessor``
VGG19      a torchvision ``vgg19`` state-dict file (``.pth`` / ``.safetensors``)
=========  ===================================================================================
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError

__all__ = [
    "DEFAULT_BLIP",
    "DEFAULT_CLIP",
    "DEFAULT_CLIP_PRETRAINED",
    "DEFAULT_DINO",
    "MAX_CACHED",
    "BlipBundle",
    "ClipBundle",
    "DinoBundle",
    "clear_cache",
    "load_blip",
    "load_clip",
    "load_dino",
    "load_vgg19_features",
]

DEFAULT_CLIP = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"
DEFAULT_DINO = "vit_small_patch16_224.dino"
DEFAULT_BLIP = "Salesforce/blip-itm-base-coco"
MAX_CACHED = 4

_CACHE: OrderedDict[tuple, Any] = OrderedDict()


def clear_cache() -> None:
    """Forget every cached model (frees their memory once no metric holds them)."""
    _CACHE.clear()


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = build()
    _CACHE[key] = value
    while len(_CACHE) > MAX_CACHED:
        _CACHE.popitem(last=False)
    return value


def _fail(what: str, spec: str, exc: BaseException, hint: str) -> ModelLoadError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return ModelLoadError(f"cannot load {what} {spec!r} ({first}); {hint}")


def _is_local(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).expanduser().exists()


# --------------------------------------------------------------------------------------------- CLIP


@dataclass
class ClipBundle:
    """An open_clip model with its eval-time image transform and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable

    @classmethod
    def wrap(cls, model: torch.nn.Module, preprocess: Callable | None = None, tokenizer: Callable | None = None):
        """Wrap an already-built open_clip model (e.g. ``open_clip.create_model('ViT-B-32', pretrained=None)``).

        Without ``preprocess`` the model's own ``visual.preprocess_cfg`` gives the transform; without
        ``tokenizer`` the OpenAI CLIP BPE tokenizer is used (right for every OpenAI-style CLIP).
        """
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        if preprocess is None:
            cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None) or {}
            preprocess = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
        return cls(model.eval(), preprocess, tokenizer or open_clip.get_tokenizer("ViT-B-32"))


def load_clip(model: str = DEFAULT_CLIP, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
              device: str = "cpu") -> ClipBundle:
    """An open_clip model by architecture + pretrained tag (``ViT-B-32``/``openai``), ``hf-hub:`` id or local folder."""

    def build() -> ClipBundle:
        import open_clip

        name, tag = model, pretrained
        if _is_local(model) and Path(model).expanduser().is_dir():
            name, tag = f"local-dir:{Path(model).expanduser()}", None
        elif model.startswith(("hf-hub:", "local-dir:")):
            tag = None
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device=device)
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:  # open_clip raises RuntimeError/FileNotFoundError/ValueError alike
            raise _fail(
                "CLIP model",
                f"{model}" + (f" / {pretrained}" if tag else ""),
                exc,
                "offline? pass a local open_clip folder (open_clip_config.json + open_clip_model.safetensors) "
                "as --clip-model DIR, or a weights file as --clip-pretrained FILE",
            ) from None
        return ClipBundle(net.eval(), preprocess, tokenizer)

    return _cached(("clip", model, pretrained, str(device)), build)


# --------------------------------------------------------------------------------------------- DINO


@dataclass
class DinoBundle:
    """A ViT whose ``forward(pixel_values)`` gives the CLS feature (timm, or transformers via ``cls_from``)."""

    model: torch.nn.Module
    transformers: bool = False

    def cls_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.transformers:
            return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]
        return self.model(pixel_values)


def load_dino(model: str = DEFAULT_DINO, device: str = "cpu") -> DinoBundle:
    """DINO ViT-S/16: a timm name (``vit_small_patch16_224.dino``), ``hf-hub:`` id, transformers id or local folder."""

    def build() -> DinoBundle:
        import json

        import timm

        hint = (
            "offline? pass a local folder as --dino-model DIR (timm: config.json + model.safetensors, "
            "as timm.models.save_for_hf writes; or a transformers ViT folder)"
        )
        path = Path(model).expanduser()
        is_dir = _is_local(model) and path.is_dir()
        cfg = json.loads((path / "config.json").read_text()) if is_dir and (path / "config.json").is_file() else {}
        use_transformers = ("model_type" in cfg) or (
            not is_dir and "/" in model and not model.startswith(("hf-hub:", "local-dir:")))
        try:
            if use_transformers:
                from transformers import AutoModel

                net = AutoModel.from_pretrained(str(path) if is_dir else model, add_pooling_layer=False)
                return DinoBundle(net.to(device).eval(), transformers=True)
            name = f"local-dir:{path}" if is_dir else model
            net = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as exc:
            raise _fail("DINO model", model, exc, hint) from None
        return DinoBundle(net.to(device).eval())

    return _cached(("dino", model, str(device)), build)


# --------------------------------------------------------------------------------------------- BLIP


@dataclass
class BlipBundle:
    """A transformers ``BlipForImageTextRetrieval`` and its ``BlipProcessor``."""

    model: torch.nn.Module
    processor: Any


def load_blip(model: str = DEFAULT_BLIP, device: str = "cpu") -> BlipBundle:
    """BLIP image-text retrieval model by hub id (``Salesforce/blip-itm-base-coco``) or local folder."""

    def build() -> BlipBundle:
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        try:
            net = BlipForImageTextRetrieval.from_pretrained(model)
            processor = BlipProcessor.from_pretrained(model)
        except Exception as exc:
            raise _fail(
                "BLIP model",
                model,
                exc,
                "offline? pass a local folder saved with save_pretrained (model + processor) as --blip-model DIR",
            ) from None
        return BlipBundle(net.to(device).eval(), processor)

    return _cached(("blip", model, str(device)), build)


# -------------------------------------------------------------------------------------------- VGG19


def load_vgg19_features(weights: str | None = "IMAGENET1K_V1", device: str = "cpu") -> torch.nn.Module:
    """``torchvision.models.vgg19(...).features`` with ImageNet weights, or a local state-dict file."""

    def build() -> torch.nn.Module:
        from torchvision.models import VGG19_Weights, vgg19
        from torchvision.models.vgg import cfgs, make_layers

        try:
            if weights and _is_local(weights):
                path = Path(weights).expanduser()
                if path.suffix == ".safetensors":
                    from safetensors.torch import load_file

                    state = load_file(str(path))
                else:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                # a whole vgg19 state dict or only its .features part
                state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
                features = make_layers(cfgs["E"])
                features.load_state_dict(state)
            else:
                features = vgg19(weights=VGG19_Weights[weights] if weights else None).features
        except Exception as exc:
            raise _fail(
                "VGG19 weights",
                str(weights),
                exc,
                "offline? pass a local torchvision vgg19 state-dict file as --vgg-weights FILE",
            ) from None
        return features.to(device).eval()

    return _cached(("vgg19", weights, str(device)), build)
