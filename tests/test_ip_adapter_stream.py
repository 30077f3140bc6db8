"""IP-Adapter from a streamed Hugging Face ``datasets`` dataset (a local image folder with ``metadata.jsonl``):
the per-process order is deterministic and addressable (a resumed reader sees what a sequential one does,
across epochs), and 2 + 2 steps with ``--resume latest`` end bitwise identical to 4 uninterrupted steps."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from trainkit import photo, tiny_config

pytest.importorskip("datasets")

CAPTIONS = ["a backpack, on a table, kitchen", "a backpack, girl, park", "a backpack, street", "a backpack, grass",
            "a backpack, snow"]


def _image_folder(root, n):
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            shutil.copy(photo("backpack", i), root / f"{i:02d}.jpg")
            f.write(json.dumps({"file_name": f"{i:02d}.jpg", "caption": CAPTIONS[i]}) + "\n")
    return root


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory):
    return _image_folder(tmp_path_factory.mktemp("stream") / "set", 3)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from accord.testing.tiny import save_tiny_image_encoder

    return save_tiny_image_encoder(tmp_path_factory.mktemp("clip_vision") / "enc")


def _reader(folder, rank=0, world=1):
    from accord.data.streamed import StreamedCaptions

    return StreamedCaptions(str(folder), 16, caption_column="caption", seed=3, buffer_size=8, rank=rank, world=world,
                            image_dropout=0.3, text_dropout=0.3, both_dropout=0.1)


def _key(sample):
    return sample["general"], sample["drop_image"], sample["pixel_values"].sum().item()


def test_stream_order_is_addressable_across_epochs_and_ranks(tmp_path):
    folder = _image_folder(tmp_path / "five", 5)
    seq = _reader(folder, 0, 2)
    sequential = [_key(s) for start in range(0, 8, 2) for s in seq.stream_samples(start, 2)]  # rank 0: 3 per epoch
    for start in (1, 3, 5, 6):  # a fresh reader (a resumed run) seeks there: within and past the first epoch
        assert [_key(s) for s in _reader(folder, 0, 2).stream_samples(start, 2)] == sequential[start : start + 2]
    assert [_key(s) for s in seq.stream_samples(2, 3)] == sequential[2:5]  # going back reopens the stream
    other = _reader(folder, 1, 2).stream_samples(0, 2)  # rank 1: the other 2 of each epoch
    seen = {k[2] for k in sequential[:3]} | {_key(s)[2] for s in other}
    assert len(seen) == 5, "the two ranks' first epochs split the set"
    assert [k[2] for k in sequential[:3]] != [k[2] for k in sequential[3:6]], "each epoch reshuffles (seed, epoch)"


def _config(model, stream_dir, encoder_dir, out, steps):
    return tiny_config(model, "", out, data={"instance_dir": ""},
                       method={"name": "ip_adapter", "image_encoder": str(encoder_dir), "ip_dataset": str(stream_dir),
                               "ip_caption_column": "caption", "ip_shuffle_buffer": 4},
                       accord={"dd_weight": 0.2, "pd_weight": 0.002},
                       train={"max_steps": steps, "checkpoint_every": 2, "checkpoints_total_limit": None})


def test_streamed_ip_adapter_resume_is_bitwise_identical(tiny_model_dir, stream_dir, encoder_dir, tmp_path):
    from safetensors.torch import load_file

    from accord.methods.ip_adapter import IP_FILE
    from accord.train import train

    model = tiny_model_dir("sd")
    # batch 2 over a 3-sample stream: step 2 starts at sample 4, inside the second epoch
    full = train(_config(model, stream_dir, encoder_dir, tmp_path / "full", 4), progress=False)
    half = train(_config(model, stream_dir, encoder_dir, tmp_path / "half", 2), progress=False)
    assert (half / IP_FILE).is_file() and (half / "checkpoints" / "step-000002").is_dir()
    resumed = train(_config(model, stream_dir, encoder_dir, tmp_path / "half", 4), resume="latest", progress=False)
    final = "checkpoints/step-000004/trainable.safetensors"
    a, b = load_file(str(full / final)), load_file(str(resumed / final))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    start = load_file(str(half / "checkpoints/step-000002/trainable.safetensors"))
    assert any(not torch.equal(a[k], start[k]) for k in a), "steps 3-4 should change the adapter"


def test_ip_dataset_is_only_for_ip_adapter(tiny_model_dir, stream_dir, tmp_path):
    from accord.errors import ConfigError

    with pytest.raises(ConfigError, match="ip_dataset is for ip_adapter"):
        tiny_config(tiny_model_dir("sd"), "", tmp_path, data={"instance_dir": ""},
                    method={"ip_dataset": str(stream_dir)})
