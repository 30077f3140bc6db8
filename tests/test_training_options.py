"""Issue 20's training options, each shown to change what it claims on the tiny fixtures: flow timesteps,
optimizers, caption dropout/shuffling, LoRA variants, several instance folders, quantization, EMA and logging."""

from __future__ import annotations

import re

import pytest
import torch

from accord.errors import ConfigError
from trainkit import tiny_config


def _one_line(err) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


# ---------------------------------------------------------------------------- 8. timesteps


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_timestep_range_and_shift_move_the_draw(family, tiny_model_dir, refs, tmp_path):
    from accord.backbones import load_backbone

    config = tiny_config(tiny_model_dir(family), refs, tmp_path / "t")
    backbone = load_backbone(config.model)
    num = backbone.noise_scheduler.config.num_train_timesteps

    def draw(**keys):
        for k, v in keys.items():
            setattr(config.train, k, v)
        backbone.check_config(config.validate())
        return backbone.sample_timesteps(2048, torch.Generator().manual_seed(0), config.train).float()

    full = draw()
    ranged = draw(min_timestep=200, max_timestep=400)
    assert float(full.min()) < 200 and float(full.max()) > 400  # the full draw covers more than the range
    assert float(ranged.min()) >= 200 and float(ranged.max()) <= 400 and ranged.unique().numel() > 50
    if family == "flux":
        grid = backbone.noise_scheduler.timesteps
        plain = draw(min_timestep=None, max_timestep=None)
        shifted = draw(timestep_shift=3.0)
        assert all(bool((grid == v).any()) for v in shifted[:64])  # still on the training grid (DDLoss needs it)
        # s=3 moves the median u=0.5 to 0.75: more than two thirds of the draws now lie above σ=0.5
        assert float((plain > num / 2).float().mean()) < 0.55 < 0.7 < float((shifted > num / 2).float().mean())
    else:
        with pytest.raises(ConfigError, match="train.timestep_shift is for flow models") as err:
            draw(min_timestep=None, max_timestep=None, timestep_shift=3.0)
        _one_line(err)


@pytest.mark.parametrize("keys, message", [
    ({"timestep_shift": 0.0}, "train.timestep_shift=0.0 must be a positive number"),
    ({"min_timestep": 500, "max_timestep": 100}, "need 0 <= min_timestep < max_timestep"),
    ({"min_timestep": -1}, "need 0 <= min_timestep"),
])
def test_bad_timestep_keys_are_one_line(keys, message, model, refs, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        tiny_config(model, refs, tmp_path / "t", train=keys)
    _one_line(err)


# ---------------------------------------------------------------------------- 1. optimizers

OPTIMIZER_CLASSES = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "prodigy": "Prodigy", "adafactor": "Adafactor",
                     "adamw_schedulefree": "AdamWScheduleFree"}
PACKAGES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt", "adamw_schedulefree": "schedulefree"}


@pytest.mark.parametrize("name", list(OPTIMIZER_CLASSES))
def test_each_optimizer_builds_and_steps(name, model, refs, tmp_path):
    from accord.optim import eval_weights, make_optimizer, set_mode

    if name in PACKAGES:
        pytest.importorskip(PACKAGES[name])
    config = tiny_config(model, refs, tmp_path / "o", train={"optimizer": name, "learning_rate": 1.0 if name == "prodigy" else 1e-2})
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    before = layer.weight.detach().clone()
    optimizer = make_optimizer(config, list(layer.parameters()))
    assert type(optimizer).__name__ == OPTIMIZER_CLASSES[name]
    set_mode(optimizer, training=True)
    for _ in range(3):
        layer(torch.randn(8, 64)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    with eval_weights(optimizer):
        moved = (layer.weight - before).abs().max()
    assert moved > 0


def test_use_8bit_adam_still_means_adamw8bit(model, refs, tmp_path):
    from accord.optim import make_optimizer

    pytest.importorskip("bitsandbytes")
    config = tiny_config(model, refs, tmp_path / "o", train={"use_8bit_adam": True})
    assert type(make_optimizer(config, list(torch.nn.Linear(4, 4).parameters()))).__name__ == "AdamW8bit"


@pytest.mark.parametrize("method, key, lr", [("lora", "text_encoder_lr", 3e-3), ("textual_inversion", "embedding_lr", 5e-2)])
def test_separate_learning_rates_set_each_kinds_step(method, key, lr, model, refs, tmp_path):
    """AdamW's first step moves every entry by about its group's learning rate: the denoiser's at
    train.learning_rate, the text side's at the separate rate."""
    from accelerate import Accelerator

    from accord.optim import make_optimizer
    from accord.train import build_model

    sections = {"method": {"name": method, "train_text_encoder": method == "lora"},
                "train": {key: lr, "learning_rate": 1e-4, "weight_decay": 0.0}}
    if method == "textual_inversion":
        sections["data"] = {"trigger": "<s*>"}
    config = tiny_config(model, refs, tmp_path / "o", **sections)
    backbone, m = build_model(config, Accelerator(cpu=True))
    groups = m.param_groups()
    optimizer = make_optimizer(config, groups)
    text_ids = {id(p) for enc in backbone.text_encoders for p in enc.parameters()}
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    for g in groups:
        for p in g["params"]:
            p.grad = torch.randn_like(p)
    optimizer.step()
    steps = {"text": [], "denoiser": []}
    for g in groups:
        for p in g["params"]:
            delta = (p.detach() - before[id(p)]).abs()
            steps["text" if id(p) in text_ids else "denoiser"].append(float(delta.max()))
    assert steps["text"] and max(steps["text"]) == pytest.approx(lr, rel=0.01)
    if method == "lora":
        assert max(steps["denoiser"]) == pytest.approx(1e-4, rel=0.01)


def test_schedulefree_resume_is_bitwise(model, refs, tmp_path):
    """A run resumed from a schedule-free checkpoint (saved at x; y is rebuilt by optimizer.train()) ends
    bitwise where the uninterrupted run ends."""
    from safetensors.torch import load_file

    from accord.train import train

    pytest.importorskip("schedulefree")
    sf = {"optimizer": "adamw_schedulefree", "checkpoint_every": 1, "checkpoints_total_limit": None, "batch_size": 1}
    whole = train(tiny_config(model, refs, tmp_path / "a", train={**sf, "max_steps": 2}), progress=False)
    train(tiny_config(model, refs, tmp_path / "b", train={**sf, "max_steps": 1}), progress=False)
    resumed = train(tiny_config(model, refs, tmp_path / "b", train={**sf, "max_steps": 2}), resume="latest",
                    progress=False)
    a = load_file(str(whole / "checkpoints/step-000002/trainable.safetensors"))
    b = load_file(str(resumed / "checkpoints/step-000002/trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    out_a = load_file(str(whole / "pytorch_lora_weights.safetensors"))
    out_b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    mid = load_file(str(whole / "checkpoints/step-000001/trainable.safetensors"))
    assert any(not torch.equal(mid[k], a[k]) for k in a)  # it trained


@pytest.mark.parametrize("keys, message", [
    ({"use_8bit_adam": True, "optimizer": "prodigy"}, "train.use_8bit_adam=true conflicts with train.optimizer=prodigy"),
    ({"optimizer": "adamw_schedulefree", "lr_scheduler": "cosine"}, "set train.lr_scheduler=constant"),
    ({"text_encoder_lr": 0.0}, "train.text_encoder_lr=0.0 must be a positive learning rate"),
    ({"optimizer": "sgd"}, "train.optimizer='sgd' is not allowed"),
])
def test_bad_optimizer_keys_are_one_line(keys, message, model, refs, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        tiny_config(model, refs, tmp_path / "t", train=keys)
    _one_line(err)
