"""FLUX and SD3 LoRAs in the kohya-style keys that ComfyUI's LoRA loader maps onto its own model.

ComfyUI (``comfy/lora.py``, ``model_lora_keys_unet``) builds, for FLUX (``comfy.utils.flux_to_diffusers``) and
SD3 (``comfy.utils.mmdit_to_diffusers``), a map from each diffusers module name ``M`` of the transformer to its
own weight (a slice of the fused ``qkv`` for ``to_q``/``to_k``/``to_v``), and accepts it under the key
``"lora_transformer_" + M.replace(".", "_")`` (the format OneTrainer writes). ``load_lora`` then reads, per key
``K``, ``K.lora_up.weight``, ``K.lora_down.weight`` and ``K.alpha``. Its maintainers do not add new
diffusers-key formats, so this file is what ComfyUI users load; diffusers' ``load_lora_weights`` reads the
diffusers file beside it.

The key names come from diffusers' own peft → kohya converter (``convert_state_dict_to_kohya``) with the
``lora_transformer`` prefix; only ``alpha`` is rewritten (the converter assumes alpha = rank).
"""

from __future__ import annotations

import torch

__all__ = ["COMFY_PREFIX", "comfy_transformer_lora"]

COMFY_PREFIX = "lora_transformer"


def comfy_transformer_lora(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft's ``get_peft_model_state_dict`` of a FLUX/SD3 transformer → ``lora_transformer_*`` keys with
    ``lora_down``/``lora_up`` and each module's ``alpha``."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya({f"{COMFY_PREFIX}.{k}": v for k, v in peft_state.items()})
    out = {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v for k, v in kohya.items()}
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}
