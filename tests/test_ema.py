"""train.ema_decay: the outputs are diffusers' EMAModel average of the trained weights (its decay schedule
min(ema_decay, n/(n+9)), the first update a copy), its state is in every checkpoint, and a resumed run with EMA
on ends bitwise where the uninterrupted one ends."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from trainkit import tiny_config

from accord.config import config_from_dict
from accord.errors import ConfigError

CKPT = {"checkpoint_every": 1, "checkpoints_total_limit": None, "batch_size": 1}


def _as_output(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """trainable.safetensors keys (peft, ``m0.`` = the UNet) -> pytorch_lora_weights.safetensors keys."""
    return {k.replace("m0.", "unet.", 1).replace(".lora_A.default.", ".lora.down.")
            .replace(".lora_B.default.", ".lora.up."): v for k, v in trainable.items()}


def test_outputs_are_the_hand_computed_ema(model, refs, tmp_path):
    from accord.train import train

    decay = 0.2  # EMAModel applies 0 at update 1, min(0.2, 2/11) at update 2, min(0.2, 3/12) = 0.2 at update 3
    out = train(tiny_config(model, refs, tmp_path / "run", train={**CKPT, "max_steps": 3, "ema_decay": decay}),
                progress=False)
    raw = [load_file(str(out / f"checkpoints/step-00000{s}/trainable.safetensors")) for s in (1, 2, 3)]
    expected = {}
    for key in raw[0]:
        ema = raw[0][key].clone()  # update 1 copies
        for weights, d in zip(raw[1:], (2 / 11, decay)):
            ema = d * ema + (1 - d) * weights[key]
        expected[key] = ema
    written = load_file(str(out / "pytorch_lora_weights.safetensors"))
    expected, last = _as_output(expected), _as_output(raw[2])
    assert set(expected) == set(written)
    for key, value in written.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-7, msg=key)
    assert any((written[k] - last[k]).abs().max() > 1e-5 for k in written), "the output should not be the raw weights"
    # a checkpoint's outputs are the average at its step too; its trainable.safetensors the raw weights
    mid = load_file(str(out / "checkpoints/step-000002/pytorch_lora_weights.safetensors"))
    raw2 = _as_output(raw[1])
    assert any((mid[k] - raw2[k]).abs().max() > 1e-5 for k in mid)


def test_resume_with_ema_is_bitwise(model, refs, tmp_path):
    """1 step, then --resume to 3, ends bitwise where 3 uninterrupted steps end: the raw weights, the EMA state and
    the averaged outputs (EMA restarted from the resumed weights would differ)."""
    from accord.train import train

    ema = {"ema_decay": 0.5, "ema_on_cpu": True}
    whole = train(tiny_config(model, refs, tmp_path / "a", train={**CKPT, **ema, "max_steps": 3}), progress=False)
    train(tiny_config(model, refs, tmp_path / "b", train={**CKPT, **ema, "max_steps": 1}), progress=False)
    resumed = train(tiny_config(model, refs, tmp_path / "b", train={**CKPT, **ema, "max_steps": 3}),
                    resume="latest", progress=False)
    for name in ("checkpoints/step-000003/trainable.safetensors", "checkpoints/step-000003/ema.safetensors",
                 "pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_refuses_a_checkpoint_without_its_ema_file(model, refs, tmp_path):
    from accord.errors import CheckpointError
    from accord.train import train

    run = tmp_path / "run"
    train(tiny_config(model, refs, run, train={**CKPT, "max_steps": 1, "ema_decay": 0.5}), progress=False)
    (run / "checkpoints/step-000001/ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="ema.safetensors is missing"):
        train(tiny_config(model, refs, run, train={**CKPT, "max_steps": 2, "ema_decay": 0.5}), resume="latest",
              progress=False)


@pytest.mark.parametrize("keys, message", [
    ({"ema_decay": 1.0}, "train.ema_decay=1.0 is outside [0, 1)"),
    ({"ema_decay": -0.1}, "train.ema_decay=-0.1 is outside [0, 1)"),
    ({"ema_on_cpu": True}, "train.ema_on_cpu is set but train.ema_decay=0"),
    ({"ema_decay": 0.99, "optimizer": "adamw_schedulefree"}, "schedule-free already saves its averaged weights"),
])
def test_bad_ema_settings_get_one_line(keys, message, tmp_path):
    data = {"model": {"pretrained": "x"}, "data": {"instance_dir": str(tmp_path), "class_noun": "dog"},
            "train": keys}
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as err:
        config_from_dict(data).validate()
    assert "\n" not in str(err.value)
