"""Training metadata in the safetensors header of every LoRA/embedding file a run writes.

kohya's ``ss_*`` keys (sd-scripts ``train_network.py``; A1111, ComfyUI and civitai read them to show the base
model, rank and trigger words) where they apply, and an ``accord`` block with what ACCORD adds. safetensors
metadata is ``str -> str``, so numbers are written as text and dicts as JSON. Read it back with
``safetensors.safe_open(path, "pt").metadata()``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path

__all__ = ["base_model_version", "training_metadata", "network_metadata", "stamp", "tag_frequency"]


def base_model_version(backbone) -> str:
    """kohya's ``ss_base_model_version``: ``sd_v1``, ``sd_v2`` (``_v`` for v-prediction), ``sdxl_base_v1-0``,
    ``flux1`` (sd-scripts' values), ``sd3``."""
    family = backbone.family
    if family == "sd":
        v2 = backbone.text_encoders[0].config.hidden_size == 1024  # OpenCLIP-H: SD 2.x
        v = backbone.noise_scheduler.config.get("prediction_type") == "v_prediction"
        return "sd_v2" * v2 + "sd_v1" * (not v2) + "_v" * v
    return {"sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}.get(family, family)


def tag_frequency(config) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: ``{folder name: {caption phrase: images holding it}}`` of the reference folder."""
    from ..data.references import scan_references

    d = config.data
    folder = Path(d.instance_dir)
    if not d.instance_dir or not folder.is_dir():
        return {}
    with warnings.catch_warnings():  # the run already warned about these captions
        warnings.simplefilter("ignore")
        items = scan_references(folder, d.trigger, d.class_noun, on_bad_image="skip")
    from ..data.captions import split_phrases

    counts = Counter(p for item in items for p in dict.fromkeys(split_phrases(item.caption)))
    return {folder.name: dict(counts.most_common())}


def training_metadata(config, backbone, tags: dict | None = None) -> dict[str, str]:
    """The keys every file of a run gets: base model, resolution, steps, tag frequency, output name, ``accord``."""
    d, a = config.data, config.accord
    accord = {
        "trigger": d.trigger, "class_noun": d.class_noun, "method": config.method.name,
        "base_model": config.model.pretrained,
        "dd_weight": a.dd_weight, "pd_weight": a.pd_weight, "dd_scale": a.dd_scale,
        "dd_variant": getattr(a, "dd_variant", "paper"),
    }
    from ..methods.lora import LoraAdapterOptions

    if isinstance(config.method, LoraAdapterOptions):  # the methods that train a peft LoRA
        accord["lora"] = _lora_settings(config.method)
    from .. import __version__

    meta = {
        "ss_base_model_version": base_model_version(backbone),
        "ss_resolution": f"({d.resolution}, {d.resolution})",
        "ss_steps": str(config.train.max_steps),
        "ss_output_name": Path(config.train.output_dir).name,
        "accord": json.dumps(accord),
        "accord_version": __version__,
    }
    if tags:
        meta["ss_tag_frequency"] = json.dumps(tags)
    return meta


def _lora_settings(m) -> dict:
    """``method.lora_*`` as trained (alphas resolved to their defaults)."""
    out = {"variant": m.lora_variant, "rank": m.lora_rank, "alpha": float(m.alpha)}
    if m.lora_conv_rank:
        out.update(conv_rank=m.lora_conv_rank, conv_alpha=float(m.conv_alpha))
    return out


def _kohya_alpha(alpha: float, rank: int, variant: str) -> float:
    """The alpha whose kohya scale alpha / rank is the trained one (rsLoRA trains at alpha / sqrt(rank))."""
    return float(alpha) * math.sqrt(rank) if variant == "rslora" else float(alpha)


def network_metadata(config) -> dict[str, str]:
    """``ss_network_dim`` / ``ss_network_alpha`` of a LoRA file (alpha defaults to the rank, as in training; for
    rsLoRA the alpha that gives its scale under kohya's alpha / rank) and, for a variant or conv LoRA, kohya's
    ``ss_network_args`` (``algo``, ``conv_dim``, ``conv_alpha``, ``dora_wd``, ``rs_lora``, as LyCORIS names them)."""
    lora = _lora_settings(config.method)
    variant = lora["variant"]
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora["rank"]),
            "ss_network_alpha": str(_kohya_alpha(lora["alpha"], lora["rank"], variant))}
    args = {}
    if "conv_rank" in lora:
        args = {"algo": "locon", "conv_dim": str(lora["conv_rank"]),
                "conv_alpha": str(_kohya_alpha(lora["conv_alpha"], lora["conv_rank"], variant))}
    if variant != "lora":
        args = {"algo": args.get("algo", "lora"), **args, {"dora": "dora_wd", "rslora": "rs_lora"}[variant]: "True"}
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return meta


def stamp(path: Path, metadata: dict[str, str]) -> None:
    """Add ``metadata`` to the header of the safetensors file ``path`` (keys already there, such as diffusers'
    ``lora_adapter_metadata`` or an embedding's ``token``, are kept); rewritten atomically."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        merged = {**metadata, **(f.metadata() or {})}
    tensors = load_file(str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in merged.items()})
    os.replace(tmp, path)
