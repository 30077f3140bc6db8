"""Class images for prior preservation: cached, resumable, deterministic, spread over processes."""

from __future__ import annotations

import hashlib
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from accord.data import ClassImages, class_image_path, collate_references, generate_class_images
from accord.errors import ConfigError, DataError

GEN = {"batch_size": 2, "seed": 0, "num_inference_steps": 2, "height": 32, "width": 32, "progress": False}


class CountingFactory:
    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __call__(self):
        self.calls += 1
        return self.pipe


class FakeState:
    """Duck-typed ``accelerate.PartialState`` for process ``rank`` of ``world``."""

    def __init__(self, rank, world):
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")
        self.barriers = 0

    def wait_for_everyone(self):
        self.barriers += 1


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


class FakePipeline:
    """Stands in for a diffusers pipeline where threads would race on a real scheduler's state."""

    def set_progress_bar_config(self, **kwargs):
        pass

    def to(self, device):
        return self

    def __call__(self, prompt, generator, height, width, **kwargs):
        assert len(prompt) == len(generator)
        colors = [tuple(torch.randint(0, 256, (3,), generator=g).tolist()) for g in generator]
        return SimpleNamespace(images=[Image.new("RGB", (width, height), c) for c in colors])


@pytest.fixture
def factory(tiny_sd):
    return CountingFactory(tiny_sd)


def test_generate_then_cached_then_completed(tmp_path, factory):
    folder = tmp_path / "class"
    written = generate_class_images(factory, "a backpack", folder, 3, **GEN)
    assert [p.name for p in written] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in written]  # no temp files left
    assert all(Image.open(p).size == (32, 32) for p in written)
    first = {p.name: digest(p) for p in written}
    reference = pixels(folder / "class_00001.png")

    assert generate_class_images(factory, "a backpack", folder, 3, **GEN) == []
    assert factory.calls == 1  # nothing missing → the pipeline is not even built

    # a partially filled folder is completed; the kept files are untouched
    (folder / "class_00001.png").unlink()
    written = generate_class_images(factory, "a backpack", folder, 5, **{**GEN, "batch_size": 3})
    assert [p.name for p in written] == ["class_00001.png", "class_00003.png", "class_00004.png"]
    assert digest(folder / "class_00000.png") == first["class_00000.png"]
    assert digest(folder / "class_00002.png") == first["class_00002.png"]
    # the regenerated image comes from the same seed; another batch size only changes float rounding
    assert np.abs(pixels(folder / "class_00001.png") - reference).max() <= 1
    assert np.abs(pixels(folder / "class_00000.png") - reference).max() > 20

    ds = ClassImages(folder, "a backpack", 32, num_images=5)
    batch = collate_references([ds[i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["caption"] == ["a backpack"] * 5 and batch["personal"] == [""] * 5


def test_user_images_count_toward_the_total(tmp_path, factory):
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(folder / "my_photo.jpg")
    written = generate_class_images(factory, "a dog", folder, 2, **GEN)
    assert [p.name for p in written] == ["class_00000.png"]
    assert len(ClassImages(folder, "a dog", 32)) == 2


class ThreadState(FakeState):
    def __init__(self, rank, world, barrier):
        super().__init__(rank, world)
        self.barrier = barrier

    def wait_for_everyone(self):
        super().wait_for_everyone()
        self.barrier.wait(timeout=30)


def test_processes_split_the_missing_indices(tmp_path):
    """Two "processes" (threads with a real barrier) plan on the same folder, then write their own slices."""
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "class_00001.png")  # already there
    barrier = threading.Barrier(2)
    states = [ThreadState(r, 2, barrier) for r in range(2)]
    results, errors = {}, []

    def work(state):
        try:
            mine = generate_class_images(FakePipeline, "a cat", folder, 6, accelerator=state, **GEN)
            results[state.process_index] = mine
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in states]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert [p.name for p in results[0]] == ["class_00000.png", "class_00003.png", "class_00005.png"]
    assert [p.name for p in results[1]] == ["class_00002.png", "class_00004.png"]
    assert all(s.barriers == 2 for s in states)
    # the same images as one process with another batch size: the seed belongs to the index
    single = tmp_path / "single"
    generate_class_images(FakePipeline, "a cat", single, 6, **{**GEN, "batch_size": 4})
    for i in (0, 2, 3, 4, 5):
        assert digest(single / f"class_{i:05d}.png") == digest(folder / f"class_{i:05d}.png")


def test_second_process_split(tmp_path, factory):
    written = generate_class_images(factory, "a cat", tmp_path / "c", 5, accelerator=FakeState(1, 2), **GEN)
    assert [p.name for p in written] == ["class_00001.png", "class_00003.png"]
    assert class_image_path(tmp_path, 3).name == "class_00003.png"


def test_class_image_errors(tmp_path, factory):
    with pytest.raises(DataError, match="does not exist"):
        ClassImages(tmp_path / "nope", "a dog", 32)
    (tmp_path / "few").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "few" / "a.png")
    with pytest.raises(DataError, match="has 1 images but 3 are needed; run generate_class_images"):
        ClassImages(tmp_path / "few", "a dog", 32, num_images=3)
    with pytest.raises(ConfigError, match="class_prompt"):
        ClassImages(tmp_path / "few", " ", 32)
    with pytest.raises(ConfigError, match="class_prompt"):
        generate_class_images(factory, "", tmp_path / "x", 1, **GEN)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        generate_class_images(factory, "a dog", tmp_path / "file", 1, **GEN)
    assert factory.calls == 0
