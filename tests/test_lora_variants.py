"""method.lora_variant (dora, rslora) and method.lora_conv_rank (LoCon) through peft: the trained model is what
it claims, stock diffusers' load_lora_weights reproduces it from both files, the kohya file's alpha / rank is the
trained scale of every module (ComfyUI's arithmetic), DoRA writes no kohya file, and the headers record it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from trainkit import header, tiny_config

from accord.config import config_from_dict
from accord.errors import ConfigError
from accord.methods.lora import KOHYA_FILE, LORA_FILE

VARIANTS = {
    "dora": {"lora_variant": "dora"},
    "rslora": {"lora_variant": "rslora", "lora_alpha": 8, "train_text_encoder": True},
    "conv": {"lora_conv_rank": 2, "lora_conv_alpha": 4},
}


@pytest.fixture(scope="module")
def trained(model, refs, tmp_path_factory):
    """variant -> (run folder, config, the trained model's method): 2 steps, the model rebuilt from the final
    checkpoint's trained tensors."""
    from accelerate import Accelerator

    from accord.train import build_model, train

    done = {}

    def get(variant):
        if variant not in done:
            config = tiny_config(model, refs, tmp_path_factory.mktemp(variant), method=VARIANTS[variant],
                                 train={"max_steps": 2, "learning_rate": 1e-2})
            out = train(config, progress=False)
            _, method = build_model(config, Accelerator(cpu=True))
            method.load_trainable_state(load_file(str(out / "checkpoints/step-000002/trainable.safetensors")))
            done[variant] = out, config, method
        return done[variant]

    return get


def _stock(model, out, weight_name):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out), weight_name=weight_name)
    return pipe


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), encoder_hidden_states=context).sample


def _text_out(encoder):
    with torch.no_grad():
        return encoder(torch.arange(1, 17).view(2, 8))[0]


def _lora_layers(module):
    from peft.tuners.lora import LoraLayer

    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer) and layer.r}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_variant_trains_as_it_claims(trained, variant):
    out, config, method = trained(variant)
    layers = _lora_layers(method.backbone.denoiser)
    conv = {n: layer for n, layer in layers.items() if isinstance(layer.get_base_layer(), torch.nn.Conv2d)}
    if variant == "dora":
        assert all(layer.use_dora["default"] for layer in layers.values())
        magnitude = dict(method.backbone.denoiser.named_parameters())
        assert any(k.endswith("lora_magnitude_vector.default.weight") for k in magnitude)
    elif variant == "rslora":
        assert {layer.scaling["default"] for layer in layers.values()} == {8 / 2}  # alpha / sqrt(rank 4)
        assert {layer.scaling["default"] for layer in _lora_layers(method.backbone.text_encoders[0]).values()} == {4}
    else:
        assert conv and any("resnets" in n and n.endswith("conv1") for n in conv)
        assert any("downsamplers" in n for n in conv) and any("upsamplers" in n for n in conv)
        assert {layer.r["default"] for layer in conv.values()} == {2}
        assert {layer.scaling["default"] for layer in conv.values()} == {4 / 2}
        assert any(layer.lora_B["default"].weight.abs().max() > 0 for layer in conv.values())  # they trained
    if variant != "conv":
        assert not conv


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stock_diffusers_loads_the_trained_model(model, trained, variant):
    """pytorch_lora_weights.safetensors (and lora_kohya.safetensors where written) in stock diffusers give the
    trained UNet's (and text encoder's) output."""
    out, config, method = trained(variant)
    expected = _unet_out(method.backbone.denoiser)
    base = _unet_out(_stock(model, out, LORA_FILE).unet.__class__.from_pretrained(model, subfolder="unet"))
    assert (expected - base).abs().max() > 1e-3, "the LoRA should change the UNet"
    files = [LORA_FILE] + ([KOHYA_FILE] if variant != "dora" else [])
    for name in files:
        pipe = _stock(model, out, name)
        torch.testing.assert_close(_unet_out(pipe.unet), expected, rtol=1e-4, atol=1e-5, msg=name)
        if config.method.train_text_encoder:
            torch.testing.assert_close(_text_out(pipe.text_encoder), _text_out(method.backbone.text_encoders[0]),
                                       rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("variant", ["rslora", "conv"])
def test_kohya_alpha_over_rank_is_the_trained_scale(trained, variant):
    """Every module of lora_kohya.safetensors: (alpha / rank) * up @ down (ComfyUI's and A1111's arithmetic) is
    the trained delta, scale x B @ A; conv modules are in kohya naming with 4-D weights."""
    out, config, method = trained(variant)
    kohya = load_file(str(out / KOHYA_FILE))
    modules = {k.split(".")[0] for k in kohya}
    sources = [("lora_unet_", method.backbone.denoiser)]
    if config.method.train_text_encoder:
        sources.append(("lora_te_text_model_", method.backbone.text_encoders[0]))
    layers = {prefix + name.replace(".", "_"): layer for prefix, module in sources
              for name, layer in _lora_layers(module).items()}
    assert modules == set(layers)
    for name, layer in layers.items():
        up, down, alpha = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"], kohya[f"{name}.alpha"]
        delta = (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        trained_delta = layer.scaling["default"] * (b.flatten(1) @ a.flatten(1))
        torch.testing.assert_close(delta, trained_delta.detach(), rtol=1e-5, atol=1e-8, msg=name)
    if variant == "conv":
        conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
        assert kohya[f"{conv1}.lora_down.weight"].dim() == 4 and kohya[f"{conv1}.lora_down.weight"].shape[0] == 2
        assert float(kohya[f"{conv1}.alpha"]) == 4.0
    else:
        assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {16.0}  # 8 * sqrt(4)


def test_dora_writes_no_kohya_file_and_says_why(trained):
    out, _, _ = trained("dora")
    assert not (out / KOHYA_FILE).exists()
    assert not (out / "checkpoints/step-000002" / KOHYA_FILE).exists()
    readme = (out / "README.md").read_text()
    assert f"{KOHYA_FILE} is not written for method.lora_variant=dora" in readme
    assert json.loads((out / "train_summary.json").read_text())["outputs"] == [LORA_FILE]


@pytest.mark.parametrize("variant, args, alpha", [
    ("dora", {"algo": "lora", "dora_wd": "True"}, "4.0"),
    ("rslora", {"algo": "lora", "rs_lora": "True"}, "16.0"),
    ("conv", {"algo": "locon", "conv_dim": "2", "conv_alpha": "4.0"}, "4.0"),
])
def test_headers_record_the_variant(trained, variant, args, alpha):
    out, _, _ = trained(variant)
    for name in [LORA_FILE] + ([KOHYA_FILE] if variant != "dora" else []):
        meta = header(out / name)
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", alpha), name
        assert json.loads(meta["ss_network_args"]) == args, name
        lora = json.loads(meta["accord"])["lora"]
        assert lora["variant"] == VARIANTS[variant].get("lora_variant", "lora")
        assert lora.get("conv_rank") == VARIANTS[variant].get("lora_conv_rank")


@pytest.mark.parametrize("method, message", [
    ({"lora_variant": "loha"}, "method.lora_variant='loha' is not allowed; choose one of 'lora', 'dora', 'rslora'"),
    ({"lora_conv_rank": -1}, "method.lora_conv_rank=-1 is negative"),
    ({"lora_conv_alpha": 4}, "method.lora_conv_alpha=4.0 is set but method.lora_conv_rank=0"),
    ({"name": "dreambooth", "lora_variant": "dora"}, "method.lora_variant is for lora / break_a_scene, not dreambooth"),
    ({"name": "dreambooth", "lora_conv_rank": 4}, "method.lora_conv_rank is for lora / break_a_scene, not dreambooth"),
])
def test_bad_lora_settings_get_one_line(method, message, tmp_path):
    data = {"model": {"pretrained": "x"}, "data": {"instance_dir": str(tmp_path), "class_noun": "dog"},
            "method": method}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data).validate()
    assert message in str(err.value) and "\n" not in str(err.value)
