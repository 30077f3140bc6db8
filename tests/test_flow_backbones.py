"""Flow-matching backbones (FLUX.1, SD3): LoRA with DDLoss through the flow formula and logit-normal
timesteps trains on tiny models; stock pipelines load the result; lean equals fast; bad settings get one line."""

from __future__ import annotations

import json

import pytest
import torch
from trainkit import tiny_config

from accord.errors import ConfigError

PIPELINES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]  # as examples/
FLOW = dict(accord={"dd_weight": 0.2}, method={"lora_targets": TARGETS},
            train={"max_steps": 2, "timestep_sampling": "logit_normal"})


def _image(pipe):
    return pipe("a sks backpack, girl, park", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.slow
def test_lora_with_ddloss_trains_and_loads_into_stock_pipeline(family, tiny_model_dir, refs, tmp_path):
    import diffusers

    from accord.inference import load_trained
    from accord.train import train

    model = tiny_model_dir(family)
    logged = []
    from accord import train as train_module

    original = train_module.run_step

    def spy(*args, **kwargs):
        losses = original(*args, **kwargs)
        logged.append(float(losses.parts["dependence_shift"]))
        return losses

    train_module.run_step = spy
    try:
        out = train(tiny_config(model, refs, tmp_path / "run", **FLOW), progress=False)
    finally:
        train_module.run_step = original
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(logged)))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["outputs"] == ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"]

    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(model)
    base = _image(pipe)
    pipe.load_lora_weights(str(out))
    tuned = _image(pipe)
    assert tuned.shape == (1, 32, 32, 3) and abs(tuned - base).max() > 0, "the trained LoRA should change the image"
    loaded = load_trained(out)
    assert type(loaded).__name__ == PIPELINES[family]
    assert abs(_image(loaded) - tuned).max() < 1e-5


def _comfy_lora_keys(family: str, config: dict) -> set[str]:
    """A re-statement of ComfyUI's LoRA key map for diffusers-named FLUX/SD3 modules (comfy/lora.py
    ``model_lora_keys_unet`` over comfy/utils.py ``flux_to_diffusers`` / ``mmdit_to_diffusers``): each diffusers
    weight ``M.weight`` that the model map covers is accepted as ``"lora_transformer_" + M.replace(".", "_")``."""
    if family == "flux":
        double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                  "attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj",
                  "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
        single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out"]
        modules = [f"transformer_blocks.{i}.{m}" for i in range(config["num_layers"]) for m in double]
        modules += [f"single_transformer_blocks.{i}.{m}" for i in range(config["num_single_layers"]) for m in single]
    else:
        joint = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                 "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                 "ff_context.net.2", "norm1.linear", "norm1_context.linear"]
        modules = [f"transformer_blocks.{i}.{m}" for i in range(config["num_layers"]) for m in joint]
    return {"lora_transformer_" + m.replace(".", "_") for m in modules}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_comfy_lora_keys_all_map_and_readme_loads(family, tiny_model_dir, refs, tmp_path):
    """lora_kohya.safetensors for FLUX/SD3: every key is one ComfyUI's loader maps (lora_up/lora_down/alpha of a
    mapped module) and the factors are the diffusers file's; the run README's lines load the diffusers file."""
    from safetensors.torch import load_file
    from trainkit import header, run_readme

    from accord.train import train

    model = tiny_model_dir(family)
    flow = {**FLOW, "train": {**FLOW["train"], "max_steps": 1}, "method": {**FLOW["method"], "lora_alpha": 8}}
    out = train(tiny_config(model, refs, tmp_path / "run", **flow), progress=False)
    comfy = load_file(out / "lora_kohya.safetensors")
    config = json.loads((model / "transformer" / "config.json").read_text())
    mapped = _comfy_lora_keys(family, config)
    left = [k for k in comfy if k.rsplit(".", 2)[0] not in mapped and k.rsplit(".", 1)[0] not in mapped]
    consumed = {f"{m}.{s}" for m in mapped for s in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert comfy and not left and set(comfy) <= consumed, left or sorted(set(comfy) - consumed)[:5]
    diffusers_file = load_file(out / "pytorch_lora_weights.safetensors")
    assert len(comfy) == len(diffusers_file) // 2 * 3  # up, down and alpha per module
    for key, value in diffusers_file.items():  # transformer.<module>.lora_A/B.weight
        module = "lora_transformer_" + key.removeprefix("transformer.").rsplit(".", 2)[0].replace(".", "_")
        part = "lora_down" if ".lora_A." in key else "lora_up"
        assert torch.equal(comfy[f"{module}.{part}.weight"], value), key
        assert comfy[f"{module}.alpha"].item() == 8.0
    meta = header(out / "lora_kohya.safetensors")
    assert meta["ss_base_model_version"] == {"flux": "flux1", "sd3": "sd3"}[family]
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8.0")
    pipe = run_readme(out)["pipe"]
    assert type(pipe).__name__ == PIPELINES[family] and pipe.get_list_adapters()


def test_flux_lean_mode_gives_the_fast_mode_gradient(tiny_model_dir, refs, tmp_path):
    from test_train import _grads

    model = tiny_model_dir("flux")
    sections = dict(train={"timestep_sampling": "logit_normal"})
    fast, lf, calls_fast = _grads(tiny_config(model, refs, tmp_path / "f", accord={"dd_weight": 0.3}, **sections),
                                  model, refs)
    lean, ll, calls_lean = _grads(tiny_config(model, refs, tmp_path / "l", accord={"dd_weight": 0.3, "mode": "lean"},
                                              **sections), model, refs)
    assert calls_fast == [4, 4] and calls_lean == [6, 2, 2]
    assert torch.allclose(lf.total, ll.total, rtol=1e-5)
    for name in fast:
        assert torch.allclose(fast[name], lean[name], rtol=1e-4, atol=1e-7), name
    assert any(g.abs().sum() > 0 for g in fast.values())


def test_flow_timesteps_lie_on_the_training_sigma_grid(tiny_model_dir, refs, tmp_path):
    from accord.backbones import load_backbone

    config = tiny_config(tiny_model_dir("sd3"), refs, tmp_path / "t", train={"timestep_sampling": "logit_normal"})
    backbone = load_backbone(config.model)
    t = backbone.sample_timesteps(512, torch.Generator().manual_seed(0), config.train)
    grid = backbone.noise_scheduler.timesteps
    assert t.dtype == torch.float32 and all(bool((grid == v).any()) for v in t[:32])
    sigma = t / backbone.noise_scheduler.config.num_train_timesteps
    assert 0 < float(sigma.min()) and float(sigma.max()) <= 1
    # logit-normal concentrates mass in the middle (shift 3 moves it up): few samples at the ends
    assert float(((sigma < 0.05) | (sigma > 0.995)).float().mean()) < 0.1
    # PDLoss features: CLIP-G's end-of-text state through its projection (projection_dim 32 in the fixture)
    assert backbone.projected_text_features(["a sks backpack", "girl"]).shape == (2, 32)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "snr_gamma", 5.0, "train.snr_gamma is for DDPM-style sd/sdxl; flux is trained by flow matching"),
        ("method", "name", "dreambooth", "method dreambooth supports sd, sdxl; use lora for flux/sd3"),
        ("method", "train_text_encoder", True, "method.train_text_encoder is for sd/sdxl"),
        ("model", "prediction_type", "epsilon", "model.prediction_type is for sd/sdxl; flux predicts flow velocity"),
    ],
)
def test_flow_families_reject_ddpm_settings_in_one_line(section, key, value, message, tiny_model_dir, refs, tmp_path):
    import re

    from accord.train import train

    config = tiny_config(tiny_model_dir("flux"), refs, tmp_path / "bad")
    setattr(getattr(config, section), key, value)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        train(config.validate(), progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_t5_length_is_configurable_and_checked(family, tiny_model_dir, refs, tmp_path):
    from accord.backbones import load_backbone

    config = tiny_config(tiny_model_dir(family), refs, tmp_path / "t")
    config.model.max_sequence_length = 16
    backbone = load_backbone(config.model)
    # SD3 joins CLIP's and T5's sequences
    clip_tokens = backbone.tokenizers[0].model_max_length if family == "sd3" else 0
    assert backbone.encode_prompts(["a sks backpack, girl"]).embeds.shape[1] == clip_tokens + 16
    config.model.max_sequence_length = 4096
    with pytest.raises(ConfigError, match=r"model.max_sequence_length=4096: this .* takes 1 to \d+ T5 tokens"):
        load_backbone(config.model)


def test_t5_length_is_refused_for_clip_only_backbones(tiny_model_dir, refs, tmp_path):
    from accord.backbones import load_backbone

    config = tiny_config(tiny_model_dir("sd"), refs, tmp_path / "t")
    config.model.max_sequence_length = 16
    with pytest.raises(ConfigError, match="model.max_sequence_length is for flux/sd3"):
        load_backbone(config.model)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.slow
def test_ddp_two_processes_end_identical(family, tiny_model_dir, refs, tmp_path):
    """Two real processes (torchrun) train the flow backbone's LoRA with DDLoss; both replicas end equal."""
    import subprocess
    import sys

    from test_train import ENV, _write

    out = tmp_path / "ddp"
    cfg = _write(tiny_config(tiny_model_dir(family), refs, out, **{**FLOW, "train": {**FLOW["train"], "max_steps": 3}}),
                 tmp_path / "d.yaml")
    port = {"flux": "29541", "sd3": "29542"}[family]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                          "-m", "accord.cli", "train", str(cfg), "--no-progress"], env=ENV,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 3
    assert len(summary["replica_checksums"]) == 2 and summary["replicas_identical"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
