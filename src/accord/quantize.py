"""``model.quantize``: the frozen base in 8 or 4 bits, with the trained LoRA on top in full precision.

- ``int8``: torchao's int8 weight-only quantization (``quantize_`` with ``Int8WeightOnlyConfig``) of every linear
  layer of the denoiser (FLUX/SD3 transformer, SD/SDXL UNet) and of the T5 text encoder, after loading; it runs on
  the CPU and on GPUs, and peft wraps the quantized layers with its own torchao LoRA layer.
- ``nf4``: bitsandbytes' 4-bit NormalFloat (QLoRA's), applied while the pipeline loads through diffusers'
  ``PipelineQuantizationConfig``; diffusers' bitsandbytes loader needs a GPU, so on a machine without one nf4 is
  refused with one line (use int8 there).

Only frozen weights are quantized: the text encoders that a method trains (CLIP with
``method.train_text_encoder``) stay as they are, and methods that train base weights themselves are refused.
"""

from __future__ import annotations

import importlib.util

import torch

from .errors import ConfigError

__all__ = ["QUANTIZE_MODES", "check_quantize_config", "pipeline_quantization", "quantize_frozen",
           "quantized_targets"]

QUANTIZE_MODES = ("none", "int8", "nf4")
_LIBRARY = {"int8": ("torchao", "pip install 'accord[quant]' (torchao)"),
            "nf4": ("bitsandbytes", "pip install 'accord[bnb]' (bitsandbytes)")}


def check_quantize_config(config) -> None:
    """One line for a quantized base that cannot work: a method training base weights, or a missing library."""
    mode = config.model.quantize
    if mode == "none":
        return
    name = config.method.name
    if not config.method.quantizable_base:  # the method's options say whether it trains base weights
        from .methods.base import methods_with

        fits = " or ".join(f"method.name={n}" for n in methods_with("quantizable_base"))
        what = "a full fine-tune: it trains the base weights" if name == "dreambooth" else "it trains base weights"
        raise ConfigError(f"model.quantize={mode} quantizes the frozen base, but method {name} is {what} "
                          f"that quantization would freeze; use {fits} or model.quantize=none")
    module, install = _LIBRARY[mode]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"model.quantize={mode} needs {module}: {install}")


def _is_t5(module) -> bool:
    return type(module).__name__.startswith("T5")


def quantized_targets(backbone) -> list[torch.nn.Module]:
    """The modules ``model.quantize`` quantizes: the denoiser and the T5 encoders (CLIP is small, and trainable)."""
    return [backbone.denoiser, *(e for e in backbone.text_encoders if e is not None and _is_t5(e))]


def pipeline_quantization(mode: str, family: str, dtype: torch.dtype):
    """For nf4: the ``quantization_config`` that ``DiffusionPipeline.from_pretrained`` takes (None otherwise)."""
    if mode != "nf4":
        return None
    if not torch.cuda.is_available():
        raise ConfigError("model.quantize=nf4 needs a CUDA GPU (bitsandbytes' 4-bit loading in diffusers); on this "
                          "machine use model.quantize=int8 (torchao, CPU and GPU) or none")
    from diffusers.quantizers import PipelineQuantizationConfig

    components = {"sd": ["unet"], "sdxl": ["unet"], "flux": ["transformer", "text_encoder_2"],
                  "sd3": ["transformer", "text_encoder_3"]}[family]
    return PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype},
        components_to_quantize=components)


def quantize_frozen(backbone, mode: str, dtype: torch.dtype, device) -> None:
    """int8: quantize :func:`quantized_targets` in place, layer by layer on ``device`` (so the full-precision model
    never has to fit there), in ``dtype`` (the autocast dtype; torchao keeps the weight's dtype for its scales).
    nf4 was applied at load time; other modes do nothing."""
    if mode != "int8":
        return
    import warnings

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    # peft warns, once per run, that its torchao LoRA layers cannot merge; accord never merges them (the LoRA file
    # is saved apart and loads into the unquantized model).
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without", category=UserWarning)
    for module in quantized_targets(backbone):
        module.to(dtype=dtype)
        quantize_(module, Int8WeightOnlyConfig(), device=device)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds weights ``model.quantize`` produced (torchao tensors or bitsandbytes parameters)."""
    if getattr(module, "is_loaded_in_4bit", False) or getattr(module, "is_quantized", False):
        return True
    return any(type(p).__module__.startswith(("torchao", "bitsandbytes")) for p in module.parameters())
