"""LoRA (Hu et al., 2021) on the UNet or transformer attention, optionally on the text encoders, through peft.

Outputs: ``pytorch_lora_weights.safetensors`` in diffusers format (``pipe.load_lora_weights``) and
``lora_kohya.safetensors`` for A1111/ComfyUI/kohya: for sd/sdxl kohya's ``lora_unet_*``/``lora_te*`` keys
(diffusers' ``convert_state_dict_to_kohya``), for FLUX/SD3 the ``lora_transformer_*`` keys ComfyUI's loader maps
(:mod:`accord.export.comfy`). Both carry the run's training metadata (:mod:`accord.export.metadata`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MethodOptions, _f
from ..errors import ConfigError
from .base import Method, TextEncoderOptions, register

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
#: method.lora_variant: peft LoraConfig plain, use_dora, use_rslora
LORA_VARIANTS = ("lora", "dora", "rslora")
#: UNet convolutions ``method.lora_conv_rank`` adapts (kohya's LoCon set: ResNet blocks, down/upsamplers)
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
#: why DoRA gets no kohya file (logged and written in the run README)
DORA_NO_KOHYA = (f"{KOHYA_FILE} is not written for method.lora_variant=dora: ComfyUI's DoRA loader (dora_scale) "
                 "divides by the norm of the base weight rather than of the adapted one (peft's DoRA), so no kohya "
                 f"file would reproduce the trained model; load {LORA_FILE} with diffusers")


def lora_config(method_config, targets, conv: bool = False):
    """peft's ``LoraConfig`` for ``method.lora_*``: the variant (``use_dora``/``use_rslora``) and, with ``conv`` and
    ``method.lora_conv_rank``, the UNet convolutions at their own rank and alpha (``rank_pattern``/``alpha_pattern``,
    which diffusers' ``load_lora_weights`` reads back from the adapter metadata)."""
    from peft import LoraConfig

    m = method_config
    targets, ranks, alphas = list(targets), {}, {}
    if conv and m.lora_conv_rank:
        targets += [t for t in CONV_TARGETS if t not in targets]
        ranks = {t: m.lora_conv_rank for t in CONV_TARGETS}
        alphas = {t: m.conv_alpha for t in CONV_TARGETS}
    return LoraConfig(r=m.lora_rank, lora_alpha=m.alpha, lora_dropout=m.lora_dropout, init_lora_weights="gaussian",
                      target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas,
                      use_dora=m.lora_variant == "dora", use_rslora=m.lora_variant == "rslora")


def unet_lora_layers(peft_state: dict, method_config) -> dict:
    """A UNet's peft LoRA state as ``save_lora_weights`` gets it: diffusers' key names, or with
    ``method.lora_conv_rank`` peft's own (diffusers' converter renames only the attention projections, and
    ``load_lora_weights`` reads a file of mixed names as peft's, so the renamed ones would not load)."""
    from diffusers.utils import convert_state_dict_to_diffusers

    return peft_state if method_config.lora_conv_rank else convert_state_dict_to_diffusers(peft_state)


def kohya_alphas(module, name) -> dict[str, float]:
    """``{kohya module name: alpha}`` for each peft LoRA layer of ``module``, with ``name(peft module path)`` the
    kohya name: alpha = peft's scale x rank, so kohya/ComfyUI's alpha / rank gives the trained scale for every
    variant (rsLoRA's alpha/sqrt(rank), the convolutions' own rank and alpha)."""
    from peft.tuners.lora import LoraLayer

    return {name(path): float(layer.scaling["default"] * layer.r["default"])
            for path, layer in module.named_modules() if isinstance(layer, LoraLayer) and "default" in layer.r}


@dataclass
class LoraAdapterOptions(MethodOptions):
    """The UNet / transformer LoRA adapter (lora, break_a_scene's phase 2)."""

    lora_rank: int = _f(16, "LoRA rank")
    lora_alpha: float | None = _f(None, "LoRA alpha; default = rank")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_targets: list = _f(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get LoRA adapters")
    lora_variant: str = _f(
        "lora", "'lora' (scale alpha/rank), 'dora' (peft's DoRA: a learned magnitude per output row; no "
        "lora_kohya.safetensors, see docs/config.md) or 'rslora' (rank-stabilised, scale alpha/sqrt(rank); the kohya "
        "file's alpha is alpha*sqrt(rank), which kohya/ComfyUI's alpha/rank turns into the same scale)",
        LORA_VARIANTS)
    lora_conv_rank: int = _f(
        0, "on sd/sdxl: LoRA rank of the UNet's convolutions too (LoCon: the ResNet blocks' conv1, conv2, "
        "conv_shortcut and the down/upsamplers' conv; kohya's conv_dim); 0: attention only")
    lora_conv_alpha: float | None = _f(None, "alpha of the convolution LoRA (kohya's conv_alpha); default: "
                                       "lora_conv_rank")

    @property
    def alpha(self) -> float:
        """``lora_alpha`` as trained: the rank where it is unset."""
        return self.lora_alpha if self.lora_alpha is not None else self.lora_rank

    @property
    def conv_alpha(self) -> float:
        """``lora_conv_alpha`` as trained: the conv rank where it is unset."""
        return self.lora_conv_alpha if self.lora_conv_alpha is not None else self.lora_conv_rank

    def validate(self, config) -> None:
        super().validate(config)
        if self.lora_conv_rank < 0:
            raise ConfigError(f"method.lora_conv_rank={self.lora_conv_rank} is negative; use 0 (no conv LoRA) or a "
                              "rank, e.g. 8")
        alpha = self.lora_conv_alpha
        if alpha is not None and not self.lora_conv_rank:
            raise ConfigError(f"method.lora_conv_alpha={alpha} is set but method.lora_conv_rank=0 (no conv LoRA); set "
                              "method.lora_conv_rank, e.g. 8, or unset method.lora_conv_alpha")
        if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"method.lora_conv_alpha={alpha} must be a positive number, or null for "
                              "method.lora_conv_rank")


@dataclass
class LoraOptions(LoraAdapterOptions, TextEncoderOptions):
    supports_masked_loss = True
    folder_triggers = True
    quantizable_base = True

    text_lora_targets: list = _f(["q_proj", "k_proj", "v_proj", "out_proj"],
                                 "text-encoder modules that get LoRA adapters (with train_text_encoder)")


@register
class LoRA(Method):
    name = "lora"
    options = LoraOptions
    output_file = LORA_FILE
    families = ("sd", "sdxl", "flux", "sd3")
    lora_files = (LORA_FILE, KOHYA_FILE)

    def setup(self) -> None:
        super().setup()
        m = self.config.method
        if m.train_text_encoder and self.backbone.denoiser_name != "unet":
            raise ConfigError(f"method.train_text_encoder is for sd/sdxl; LoRA on {self.backbone.family} trains the "
                              "transformer only: set it to false")
        if m.lora_conv_rank and self.backbone.denoiser_name != "unet":
            raise ConfigError(f"method.lora_conv_rank is for the sd/sdxl UNet's convolutions; the "
                              f"{self.backbone.family} transformer has none to adapt: set it to 0")
        self.backbone.denoiser.add_adapter(lora_config(m, m.lora_targets, conv=True))
        self.trains_text = bool(m.train_text_encoder)
        if self.trains_text:
            from peft import inject_adapter_in_model

            for encoder in self.backbone.text_encoders:
                # peft's own injection: transformers 5's add_adapter insists on a newer peft than diffusers needs.
                inject_adapter_in_model(lora_config(m, m.text_lora_targets), encoder)

    def trainable_modules(self):
        mods = [self.backbone.denoiser]
        if self.trains_text:
            mods += list(self.backbone.text_encoders)
        return mods

    def write_weights(self, output_dir: Path) -> list[Path]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        modules = self.unwrapped_modules()
        denoiser = get_peft_model_state_dict(modules[0])
        if self.backbone.denoiser_name == "unet":  # transformers keep peft keys, as diffusers' flux/sd3 scripts do
            denoiser = unet_lora_layers(denoiser, self.config.method)
        layers = {f"{self.backbone.denoiser_name}_lora_layers": denoiser}
        if self.trains_text:
            names = ["text_encoder_lora_layers", "text_encoder_2_lora_layers"]
            for name, encoder in zip(names, modules[1:]):
                layers[name] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
        # Without the adapter config stock loaders assume alpha = rank and load at the wrong strength.
        metadata = {name.replace("_layers", "_adapter_metadata"): self._adapter_config(module)
                    for name, module in zip(layers, modules)}
        self.backbone.pipeline_class.save_lora_weights(output_dir, safe_serialization=True, **layers,
                                                       **{k: v for k, v in metadata.items() if v is not None})
        if self.config.method.lora_variant == "dora":
            if not getattr(self, "_said_no_kohya", False):
                logging.getLogger("accord.lora").warning(DORA_NO_KOHYA)
                self._said_no_kohya = True
            (output_dir / KOHYA_FILE).unlink(missing_ok=True)  # a stale one from an overwritten run
            return [output_dir / LORA_FILE]
        if self.backbone.denoiser_name != "unet":
            from ..export.comfy import comfy_transformer_lora

            # one rank and alpha throughout (no conv LoRA on transformers): kohya's alpha for peft's scale
            alpha = next(iter(kohya_alphas(modules[0], str).values()))
            kohya = comfy_transformer_lora(get_peft_model_state_dict(modules[0]), alpha)
        else:
            kohya = self._kohya_state(modules)
        save_file(kohya, str(output_dir / KOHYA_FILE))
        return [output_dir / LORA_FILE, output_dir / KOHYA_FILE]

    def loading_code(self, run: str, base: str) -> str:
        cls = self.backbone.pipeline_class.__name__
        return (f"from diffusers import {cls}\n\npipe = {cls}.from_pretrained({base!r})\n"
                f"pipe.load_lora_weights({run!r}, weight_name={LORA_FILE!r})\n")

    def readme_notes(self) -> list[str]:
        keys = ("`lora_unet_*`/`lora_te*` (kohya)" if self.backbone.denoiser_name == "unet"
                else "`lora_transformer_*` (the keys ComfyUI maps for FLUX/SD3)")
        kohya = (f"- {DORA_NO_KOHYA}" if self.config.method.lora_variant == "dora" else
                 f"- `{KOHYA_FILE}`: ComfyUI's *Load LoRA* node, A1111/Forge `<lora:…>`, kohya tools; keys {keys}")
        return [f"- `{LORA_FILE}`: diffusers, `pipe.load_lora_weights` (above)", kohya,
                "- the headers carry kohya's `ss_*` training metadata and an `accord` block "
                "(`safetensors.safe_open(path, \"pt\").metadata()`)"]

    @staticmethod
    def load_into(pipeline, output_dir: Path) -> None:
        pipeline.load_lora_weights(str(output_dir), weight_name=LORA_FILE)

    @staticmethod
    def unload_from(pipeline) -> bool:
        pipeline.unload_lora_weights()
        return True


    def _adapter_config(self, module) -> dict | None:
        config = getattr(module, "peft_config", {}).get("default")
        if config is None:  # text encoders get their adapters injected without a peft_config attribute
            config = lora_config(self.config.method, self.config.method.text_lora_targets)
        return config.to_dict()

    def _kohya_state(self, modules) -> dict[str, torch.Tensor]:
        """kohya/A1111/ComfyUI keys (``lora_unet_*``, ``lora_te_*`` for SD 1/2, ``lora_te1_/lora_te2_*`` for
        SDXL) with ``lora_down``/``lora_up`` (4-D for the convolutions of ``method.lora_conv_rank``) and each
        module's ``alpha`` (diffusers' converter assumes alpha = rank; :func:`kohya_alphas` writes the one that
        gives the trained scale)."""
        from diffusers.utils import convert_state_dict_to_kohya
        from peft.utils import get_peft_model_state_dict

        def rename(key: str) -> str:
            if self.backbone.family == "sd":
                key = key.replace("lora_te1_", "lora_te_")
            # transformers 5 flattened CLIPTextModel (no .text_model); kohya keys keep the classic path.
            return re.sub(r"^(lora_te[12]?_)(?!text_model_)", r"\1text_model_", key)

        prefixes = [("unet", "lora_unet"), ("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")]
        peft_sd, alphas = {}, {}
        for (prefix, kohya_prefix), module in zip(prefixes, modules):
            peft_sd.update({f"{prefix}.{k}": v for k, v in get_peft_model_state_dict(module).items()})
            alphas.update(kohya_alphas(module, lambda path, p=kohya_prefix: rename(f"{p}_{path.replace('.', '_')}")))
        out = {}
        for key, value in convert_state_dict_to_kohya(peft_sd).items():
            key = rename(key)
            out[key] = torch.tensor(alphas[key.split(".")[0]]) if key.endswith(".alpha") else value
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}
