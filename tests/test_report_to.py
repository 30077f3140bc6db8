"""train.report_to: the step scalars (Eq. 7's eq7_* terms included) and the validation grid reach TensorBoard and
Weights & Biases (offline, no network); a missing wandb is one line."""

from __future__ import annotations

import pytest
from trainkit import tiny_config

from accord.errors import ConfigError

RUN = {"max_steps": 2, "validation_every": 2, "validation_steps": 1}
EQ7 = ("eq7_personal", "eq7_general", "eq7_null", "eq7_shift")


@pytest.fixture(autouse=True)
def _fresh_wandb():
    """wandb keeps its settings (WANDB_MODE included) process-wide from its first run: start each test afresh."""
    import sys

    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


def test_wandb_offline_run_holds_the_scalars_eq7_terms_and_grid(model, refs, tmp_path, monkeypatch):
    pytest.importorskip("wandb")

    import wandb
    from wandb.sdk.wandb_run import Run

    from accord.train import train

    logged, original = [], Run.log

    def spy(run, data, step=None, **kwargs):  # what reaches wandb's own Run.log, as accelerate's tracker calls it
        logged.append((step, dict(data)))
        return original(run, data, step=step, **kwargs)

    monkeypatch.setattr(Run, "log", spy)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    train(tiny_config(model, refs, tmp_path / "run", train={**RUN, "report_to": "wandb"}), progress=False)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert next(runs[0].glob("run-*.wandb")).stat().st_size > 0  # the offline run was written for `wandb sync`
    scalars = {step: row for step, row in logged if "loss" in row}
    assert sorted(scalars) == [1, 2]
    for row in scalars.values():
        for key in ("loss", "diffusion", "dd", "lr", *EQ7):
            assert isinstance(row.get(key), float), (key, sorted(row))
    images = [(step, row["validation"]) for step, row in logged if "validation" in row]
    assert len(images) == 1 and images[0][0] == 2 and isinstance(images[0][1][0], wandb.Image)
    assert list((runs[0] / "files" / "media" / "images").glob("validation_2_*.png"))


def test_tensorboard_gets_eq7_terms_and_the_validation_grid(model, refs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from accord.train import train

    out = train(tiny_config(model, refs, tmp_path / "run", train={**RUN, "report_to": "tensorboard"}), progress=False)
    events = list((out / "logs" / "accord").glob("events.out.tfevents.*"))  # (the hparams are in a subfolder)
    assert len(events) == 1, events
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    for tag in ("loss", *EQ7):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2], tag
    assert [e.step for e in acc.Images("validation")] == [2]


def test_report_to_wandb_without_wandb_is_one_line(model, refs, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to=wandb needs wandb: pip install wandb") as err:
        tiny_config(model, refs, tmp_path / "run", train={"report_to": "wandb"})
    assert "\n" not in str(err.value)


def test_wandb_that_cannot_start_is_one_line(model, refs, tmp_path, monkeypatch):
    """Online without a login (no network here): accord's line, not wandb's traceback."""
    pytest.importorskip("wandb")
    from accord.train import train

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))  # no stored login
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ConfigError, match=r"train.report_to=wandb: wandb could not start .*WANDB_MODE=offline") as err:
        train(tiny_config(model, refs, tmp_path / "run", train={"max_steps": 1, "report_to": "wandb"}), progress=False)
    assert "\n" not in str(err.value)
