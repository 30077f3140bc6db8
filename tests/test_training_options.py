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
