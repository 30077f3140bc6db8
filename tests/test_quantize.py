"""model.quantize: LoRA trains on an int8 (torchao) FLUX base on the CPU, the base really is int8, the LoRA loads
into an unquantized stock pipeline; settings that cannot work are one line."""

from __future__ import annotations

import re

import pytest
import torch
from trainkit import tiny_config

from accord.config import config_from_dict
from accord.errors import ConfigError

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _quantized(weight) -> bool:
    return type(weight).__module__.startswith("torchao")


def test_int8_base_trains_lora_that_loads_into_unquantized_flux(tiny_model_dir, refs, tmp_path):
    pytest.importorskip("torchao")
    from diffusers import FluxPipeline

    from accord import train as train_module

    model = tiny_model_dir("flux")
    config = tiny_config(model, refs, tmp_path / "run", accord={"dd_weight": 0.0}, method={"lora_targets": TARGETS},
                         train={"max_steps": 30, "batch_size": 4, "learning_rate": 5e-3})
    config.model.quantize = "int8"
    losses, seen = [], {}
    original = train_module.run_step

    def spy(config, backbone, *args, **kwargs):
        seen["backbone"] = backbone
        out = original(config, backbone, *args, **kwargs)
        losses.append(float(out.parts["diffusion"]))
        return out

    train_module.run_step = spy
    try:
        out = train_module.train(config.validate(), progress=False)
    finally:
        train_module.run_step = original

    backbone = seen["backbone"]
    to_q = backbone.denoiser.transformer_blocks[0].attn.to_q
    assert _quantized(to_q.base_layer.weight) and to_q.base_layer.weight.dtype == torch.float32
    assert to_q.lora_A["default"].weight.dtype == torch.float32 and not _quantized(to_q.lora_A["default"].weight)
    assert _quantized(backbone.denoiser.single_transformer_blocks[0].proj_mlp.weight)  # not a LoRA target: int8 too
    t5_linears = [m for m in backbone.text_encoders[1].modules() if isinstance(m, torch.nn.Linear)]
    assert t5_linears and all(_quantized(m.weight) for m in t5_linears)
    assert not any(_quantized(p) for p in backbone.text_encoders[0].parameters())  # CLIP stays as it is
    window = len(losses) // 4
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert len(losses) == 30 and last < first - 0.1, (first, last)

    pipe = FluxPipeline.from_pretrained(model)  # stock and unquantized
    assert not any(_quantized(p) for p in pipe.transformer.parameters())

    def image():
        return pipe("a sks backpack, girl, park", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = image()
    pipe.load_lora_weights(str(out))
    assert abs(image() - base).max() > 1e-3, "the LoRA trained on the int8 base should change the image"


def _config(tmp_path, method=None, **model):
    return config_from_dict({"model": {"pretrained": "x", **model}, "data": {"instance_dir": str(tmp_path),
                             "class_noun": "backpack"}, "method": method or {"name": "lora"}})


@pytest.mark.parametrize("method, message", [
    ("dreambooth", "model.quantize=int8 quantizes the frozen base, but method dreambooth is a full fine-tune"),
    ("custom_diffusion", "model.quantize=int8 quantizes the frozen base, but method custom_diffusion"),
])
def test_quantize_refuses_methods_that_train_base_weights(method, message, tmp_path):
    config = _config(tmp_path, {"name": method, **({"modifier_token": "sks"} if method == "custom_diffusion" else {})},
                     quantize="int8")
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        config.validate()
    assert "\n" not in str(err.value) and "method.name=lora or model.quantize=none" in str(err.value)


def test_quantize_bad_value_and_missing_library_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"model.quantize='int4' is not allowed; choose one of 'none', 'int8', 'nf4'"):
        _config(tmp_path, quantize="int4")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match=re.escape("model.quantize=int8 needs torchao: pip install 'accord[quant]'")):
        _config(tmp_path, quantize="int8").validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="nf4 is refused only without a CUDA GPU")
def test_nf4_without_gpu_is_one_line(tiny_model_dir, refs, tmp_path):
    pytest.importorskip("bitsandbytes")
    from accord.backbones import load_backbone

    config = tiny_config(tiny_model_dir("flux"), refs, tmp_path / "t")
    config.model.quantize = "nf4"
    with pytest.raises(ConfigError, match=r"model.quantize=nf4 needs a CUDA GPU .* use model.quantize=int8") as err:
        load_backbone(config.validate().model)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family, components", [("flux", ["transformer", "text_encoder_2"]),
                                                ("sd3", ["transformer", "text_encoder_3"]), ("sdxl", ["unet"])])
def test_nf4_asks_diffusers_for_bitsandbytes_nf4_of_the_frozen_parts(family, components, monkeypatch):
    """What nf4 hands DiffusionPipeline.from_pretrained (a GPU run is needed to load it; none was lent here)."""
    pytest.importorskip("bitsandbytes")
    import diffusers.quantizers  # noqa: F401  (imported before CUDA is faked: torchao probes the device on import)

    from accord.quantize import pipeline_quantization

    assert pipeline_quantization("int8", family, torch.bfloat16) is None  # int8 is applied after loading
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    quantization = pipeline_quantization("nf4", family, torch.bfloat16)
    assert quantization.components_to_quantize == components
    for name in components:
        resolved = quantization._resolve_quant_config(is_diffusers=not name.startswith("text"), module_name=name)
        assert resolved.load_in_4bit and resolved.bnb_4bit_quant_type == "nf4"
        assert resolved.bnb_4bit_compute_dtype == torch.bfloat16
