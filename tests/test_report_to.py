"""train.report_to: the step scalars (Eq. 7's eq7_* terms included) and the validation grid reach TensorBoard and
Weights & Biases (offline, no network); a missing wandb is one line."""

from __future__ import annotations

from pathlib import Path

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


def _wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file, decoded with wandb's own protobuf ``Record``. wandb 0.31 ships no Python
    reader (its Go core writes the file), so this walks the container: a 7-byte header (``:W&B``, magic, version),
    then LevelDB-log chunks in 32 KiB blocks, each ``crc32c(4) length(2, little-endian) type(1) data``, types
    1 full, 2 first, 3 middle, 4 last."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_scalars_eq7_terms_and_grid(model, refs, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import json

    from accord.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    train(tiny_config(model, refs, tmp_path / "run", train={**RUN, "report_to": "wandb"}), progress=False)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    history = {}
    for record in _wandb_records(next(runs[0].glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
    assert sorted(history) == [1, 2]
    for row in history.values():
        for key in ("loss", "diffusion", "dd", "lr", *EQ7):
            assert isinstance(row.get(key), float), (key, sorted(row))
    assert history[2]["validation/_type"] == "images/separated" and history[2]["validation/count"] == 1
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
