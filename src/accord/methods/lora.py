"""LoRA (Hu et al., 2021) on the UNet or transformer attention, optionally on the text encoders, through peft.

Outputs: ``pytorch_lora_weights.safetensors`` in diffusers format (``pipe.load_lora_weights``) and
``lora_kohya.safetensors`` for A1111/ComfyUI/kohya: for sd/sdxl kohya's ``lora_unet_*``/``lora_te*`` keys
(diffusers' ``convert_state_dict_to_kohya``), for FLUX/SD3 the ``lora_transformer_*`` keys ComfyUI's loader maps
(:mod:`accord.export.comfy`). Both carry the run's training metadata (:mod:`accord.export.metadata`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MethodOptions, _f
from .base import Method, TextEncoderOptions, register

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"


@dataclass
class LoraAdapterOptions(MethodOptions):
    """The UNet / transformer LoRA adapter (lora, break_a_scene's phase 2)."""

    lora_rank: int = _f(16, "LoRA rank")
    lora_alpha: float | None = _f(None, "LoRA alpha; default = rank")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_targets: list = _f(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get LoRA adapters")


@dataclass
class LoraOptions(LoraAdapterOptions, TextEncoderOptions):
    supports_masked_loss = True
    folder_triggers = True

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
        from peft import LoraConfig

        super().setup()
        m = self.config.method
        if m.train_text_encoder and self.backbone.denoiser_name != "unet":
            from ..errors import ConfigError

            raise ConfigError(f"method.train_text_encoder is for sd/sdxl; LoRA on {self.backbone.family} trains the "
                              "transformer only: set it to false")
        alpha = m.lora_alpha if m.lora_alpha is not None else m.lora_rank
        self.backbone.denoiser.add_adapter(
            LoraConfig(r=m.lora_rank, lora_alpha=alpha, lora_dropout=m.lora_dropout, init_lora_weights="gaussian",
                       target_modules=list(m.lora_targets))
        )
        self.trains_text = bool(m.train_text_encoder)
        if self.trains_text:
            from peft import inject_adapter_in_model

            for encoder in self.backbone.text_encoders:
                # peft's own injection: transformers 5's add_adapter insists on a newer peft than diffusers needs.
                inject_adapter_in_model(
                    LoraConfig(r=m.lora_rank, lora_alpha=alpha, lora_dropout=m.lora_dropout, init_lora_weights="gaussian",
                               target_modules=list(m.text_lora_targets)),
                    encoder,
                )

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
            denoiser = convert_state_dict_to_diffusers(denoiser)
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
        if self.backbone.denoiser_name != "unet":
            from ..export.comfy import comfy_transformer_lora

            kohya = comfy_transformer_lora(get_peft_model_state_dict(modules[0]), self._alpha())
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
        return [f"- `{LORA_FILE}`: diffusers, `pipe.load_lora_weights` (above)",
                f"- `{KOHYA_FILE}`: ComfyUI's *Load LoRA* node, A1111/Forge `<lora:…>`, kohya tools; keys {keys}",
                "- both headers carry kohya's `ss_*` training metadata and an `accord` block "
                "(`safetensors.safe_open(path, \"pt\").metadata()`)"]

    def _alpha(self) -> float:
        m = self.config.method
        return float(m.lora_alpha if m.lora_alpha is not None else m.lora_rank)

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
            from peft import LoraConfig

            m = self.config.method
            config = LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha if m.lora_alpha is not None else m.lora_rank,
                                target_modules=list(m.text_lora_targets))
        return config.to_dict()

    def _kohya_state(self, modules) -> dict[str, torch.Tensor]:
        """kohya/A1111/ComfyUI keys (``lora_unet_*``, ``lora_te_*`` for SD 1/2, ``lora_te1_/lora_te2_*`` for
        SDXL) with ``lora_down``/``lora_up`` and each module's ``alpha`` (diffusers' converter assumes
        alpha = rank, so the configured alpha is written over it)."""
        from diffusers.utils import convert_state_dict_to_kohya
        from peft.utils import get_peft_model_state_dict

        alpha = self._alpha()
        prefixes = ["unet", "text_encoder", "text_encoder_2"]
        peft_sd = {}
        for prefix, module in zip(prefixes, modules):
            peft_sd.update({f"{prefix}.{k}": v for k, v in get_peft_model_state_dict(module).items()})
        kohya = convert_state_dict_to_kohya(peft_sd)
        out = {}
        for key, value in kohya.items():
            if self.backbone.family == "sd":
                key = key.replace("lora_te1_", "lora_te_")
            # transformers 5 flattened CLIPTextModel (no .text_model); kohya keys keep the classic path.
            key = re.sub(r"^(lora_te[12]?_)(?!text_model_)", r"\1text_model_", key)
            out[key] = torch.full_like(value, alpha, dtype=torch.float32) if key.endswith(".alpha") else value
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}
