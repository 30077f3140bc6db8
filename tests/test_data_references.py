"""Reference folders: captions from sidecars / metadata.jsonl, bad files, masks, the dataset and its determinism."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_images import make_bad_files

from accord.data import (
    BucketBatchSampler,
    ReferenceDataset,
    ReferenceItem,
    collate_references,
    make_buckets,
    scan_references,
)
from accord.errors import ConfigError, DataError

DREAMBENCH_CLASSES = {
    "backpack": "backpack",
    "backpack_dog": "backpack",
    "berry_bowl": "bowl",
    "cat": "cat",
    "clock": "clock",
    "dog": "dog",
    "duck_toy": "toy",
    "teapot": "teapot",
}


def photo(path, size=(48, 32), color=(200, 30, 30), seed=0):
    """A small noisy photo (noise makes crops and flips distinguishable)."""
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(color) + rng.integers(-25, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(path)
    return path


def write_metadata(folder, *records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "refs"
    d.mkdir()
    return d


# ---- scanning ------------------------------------------------------------------------------------


def test_sidecar_captions_and_one_warning_for_missing(folder):
    for i, name in enumerate(("b.png", "a.JPG", "c.webp", "d.bmp")):
        photo(folder / name, seed=i)
    (folder / "a.txt").write_text("1 sks backpack, girl,\n park, sunset\n")
    (folder / "b.txt").write_text("a photo of SKS backpack")
    (folder / "notes.md").write_text("ignored")
    (folder / ".hidden.png").write_bytes(b"")  # hidden files (e.g. macOS ._ files) are ignored
    with pytest.warns(UserWarning) as record:
        items = scan_references(folder, "sks", "backpack")
    assert len(record) == 1
    msg = str(record[0].message)
    assert "c.webp" in msg and "d.bmp" in msg and "a sks backpack" in msg and "a.JPG" not in msg
    assert [it.path.name for it in items] == ["a.JPG", "b.png", "c.webp", "d.bmp"]
    a, b, c, _ = items
    assert a.caption == "1 sks backpack, girl, park, sunset"
    assert (a.personal, a.general) == ("1 sks backpack", "girl, park, sunset")
    assert (b.personal, b.general) == ("a photo of SKS backpack", "")
    assert (c.caption, c.personal, c.general, c.mask_path) == ("a sks backpack", "a sks backpack", "", None)
    assert a.size == (48, 32)


def test_no_warning_when_all_captioned(folder):
    photo(folder / "00.png")
    (folder / "00.txt").write_text("a sks dog, beach")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scan_references(folder, "sks", "dog")[0].general == "beach"


def test_metadata_with_explicit_general_and_masks(folder):
    (folder / "masks").mkdir()
    for name in ("00.jpg", "01.jpg", "02.jpg"):
        photo(folder / name)
    Image.new("L", (48, 32), 255).save(folder / "masks" / "00.png")
    Image.new("L", (48, 32), 0).save(folder / "01_mask.png")  # a mask in the folder itself is not a reference
    write_metadata(
        folder,
        {"file_name": "00.jpg", "caption": "a <new1> backpack, girl, park", "general": ["girl", "a sunny park"],
         "mask": "masks/00.png"},
        {"file_name": "01.jpg", "caption": "<new1> backpack on a rock", "general": "rock,  sea", "mask": "01_mask.png"},
        {"file_name": "02.jpg", "caption": "a <NEW1> backpack, snow"},
    )
    items = scan_references(folder, "<new1>", "backpack")
    assert [it.path.name for it in items] == ["00.jpg", "01.jpg", "02.jpg"]
    assert (items[0].personal, items[0].general) == ("a <new1> backpack", "girl, a sunny park")
    assert (items[1].personal, items[1].general) == ("<new1> backpack on a rock", "rock, sea")
    assert (items[2].personal, items[2].general) == ("a <NEW1> backpack", "snow")
    assert items[0].mask_path.name == "00.png" and items[1].mask_path.name == "01_mask.png"
    assert items[2].mask_path is None

    ds = ReferenceDataset(items, 32)
    masks = [ds[i]["mask"] for i in range(3)]
    assert all(m.shape == (1, 32, 32) and m.dtype == torch.float32 for m in masks)
    assert masks[0].min() == 1 and masks[1].max() == 0 and masks[2].min() == 1  # no mask → all ones
    batch = collate_references([ds[i] for i in range(3)])
    assert batch["mask"].shape == (3, 1, 32, 32)
    assert "mask" not in ReferenceDataset(items[2:], 32)[0]  # no item with a mask → no key


def test_metadata_may_omit_caption_and_use_sidecar(folder):
    photo(folder / "00.png")
    photo(folder / "01.png")
    (folder / "00.txt").write_text("a sks cat, sofa")
    write_metadata(folder, {"file_name": "00.png", "general": []},
                   {"file_name": "01.png", "caption": "a sks cat, sofa"})
    items = scan_references(folder, "sks", "cat")
    assert [(it.personal, it.general) for it in items] == [("a sks cat", ""), ("a sks cat", "sofa")]


@pytest.mark.parametrize(
    ("records", "raw", "words"),
    [
        ([{"file_name": "00.png", "caption": "a sks dog"}], ["{not json"], "line 2: invalid JSON"),
        ([{"file_name": "gone.png", "caption": "a sks dog"}], [], "line 1: file_name 'gone.png' not found"),
        ([{"file_name": "00.png", "captoin": "a sks dog"}], [], "line 1: unknown key(s) captoin"),
        ([{"caption": "a sks dog"}], [], 'line 1: missing "file_name"'),
        ([{"file_name": "00.png", "mask": "m.png"}], [], "line 1: mask 'm.png' not found"),
        ([{"file_name": "00.png"}, {"file_name": "00.png"}], [], "line 2: '00.png' is already described on line 1"),
        ([{"file_name": "00.png", "general": 3}], [], 'line 1: "general" must be'),
        ([], ["[1, 2]"], "line 1: expected a JSON object"),
    ],
)
def test_metadata_errors_name_file_and_line(folder, records, raw, words):
    photo(folder / "00.png")
    write_metadata(folder, *records, raw_lines=raw)
    with pytest.raises(DataError) as info:
        scan_references(folder, "sks", "dog")
    assert "metadata.jsonl" in str(info.value) and words in str(info.value)


def test_sidecar_and_metadata_must_agree(folder):
    photo(folder / "00.png")
    (folder / "00.txt").write_text("a sks dog, beach")
    write_metadata(folder, {"file_name": "00.png", "caption": "a sks dog, snow"})
    with pytest.raises(DataError, match="00.png: caption differs between 00.txt and metadata.jsonl line 1"):
        scan_references(folder, "sks", "dog")


def test_captions_without_trigger_are_all_named(folder):
    for name in ("00.png", "01.png", "02.png"):
        photo(folder / name)
    (folder / "00.txt").write_text("a dog, beach")
    (folder / "01.txt").write_text("a sks dog")
    write_metadata(folder, {"file_name": "02.png", "caption": "a skss dog"})
    with pytest.raises(DataError) as info:
        scan_references(folder, "sks", "dog")
    msg = str(info.value)
    assert "00.txt" in msg and "metadata.jsonl line 1" in msg and "01.txt" not in msg
    assert "add 'sks'" in msg and "set trigger" in msg


def test_missing_empty_and_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="nope does not exist"):
        scan_references(tmp_path / "nope", "sks", "dog")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="empty has no images"):
        scan_references(tmp_path / "empty", "sks", "dog")
    photo(tmp_path / "x.png")
    with pytest.raises(DataError, match="is not a folder"):
        scan_references(tmp_path / "x.png", "sks", "dog")
    with pytest.raises(ConfigError, match="on_bad_image"):
        scan_references(tmp_path, "sks", "dog", on_bad_image="ignore")
    with pytest.raises(ConfigError, match="trigger"):
        scan_references(tmp_path, "two words", "dog")


def test_bad_images_error_mode_names_each_file(folder):
    bad = make_bad_files(folder / "bad")
    for name in bad:
        d = folder / name.replace(".", "_")
        d.mkdir()
        photo(d / "good.png")
        (d / name).write_bytes((folder / "bad" / name).read_bytes())
        with pytest.raises(DataError) as info:
            scan_references(d, "sks", "dog")
        assert name in str(info.value) and bad[name] in str(info.value)


def test_bad_images_skip_mode_warns_once_listing_all(folder):
    bad = make_bad_files(folder)
    photo(folder / "good.png")
    (folder / "good.txt").write_text("a sks dog, grass")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        items = scan_references(folder, "sks", "dog", on_bad_image="skip")
    assert [it.path.name for it in items] == ["good.png"]
    assert len(record) == 1  # the bad files' missing captions are not reported: they were skipped
    msg = str(record[0].message)
    assert f"skipped {len(bad)} bad" in msg
    for name, words in bad.items():
        assert name in msg and words in msg


def test_all_images_bad_in_skip_mode(folder):
    (folder / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="empty.jpg"), pytest.raises(DataError, match="no usable images"):
        scan_references(folder, "sks", "dog", on_bad_image="skip")


def test_bad_mask_size(folder):
    photo(folder / "00.png")
    Image.new("L", (10, 10)).save(folder / "m.png")
    write_metadata(folder, {"file_name": "00.png", "caption": "a sks dog", "mask": "m.png"})
    with pytest.raises(DataError, match="m.png: mask is 10x10 but its image 00.png is 48x32"):
        scan_references(folder, "sks", "dog")


# ---- the dataset ---------------------------------------------------------------------------------


def test_dreambench_folders_load(dreambench):
    scanned = {}
    for subject, noun in DREAMBENCH_CLASSES.items():
        with pytest.warns(UserWarning, match="no caption"):
            scanned[subject] = scan_references(dreambench / subject, "sks", noun)
        assert len(scanned[subject]) >= 4
        assert all(it.personal == f"a sks {noun}" and it.general == "" for it in scanned[subject])
    ds = ReferenceDataset(scanned["teapot"], 64, center_crop=False, random_flip=True, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False, collate_fn=collate_references)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
    assert -1 <= batch["pixel_values"].min() < 0 < batch["pixel_values"].max() <= 1
    assert batch["caption"] == ["a sks teapot"] * 2 and batch["general"] == ["", ""]
    assert batch["index"].tolist() == [0, 1]
    assert batch["original_size"].shape == (2, 2) and batch["crop_top_left"].shape == (2, 2)
    assert "mask" not in batch


def test_dreambench_fullres(dreambench):
    item = ReferenceItem(dreambench / "fullres" / "backpack_00.jpg", "a sks backpack", "a sks backpack", "", None)
    sample = ReferenceDataset([item], 64)[0]
    assert sample["pixel_values"].shape == (3, 64, 64)
    w, h = Image.open(item.path).size
    assert sample["original_size"].tolist() in ([h, w], [w, h])


@pytest.fixture
def noisy_items(folder):
    for i in range(4):
        photo(folder / f"{i:02d}.png", size=(60, 40), seed=i)
    with pytest.warns(UserWarning):
        return scan_references(folder, "sks", "dog")


def _samples(ds, epoch):
    ds.set_epoch(epoch)
    return [ds[i] for i in range(len(ds))]


def test_augmentations_are_deterministic_per_seed_epoch_index(noisy_items):
    make = lambda seed: ReferenceDataset(noisy_items, 32, center_crop=False, random_flip=True, seed=seed)  # noqa: E731
    a = _samples(make(7), epoch=2)
    b = _samples(make(7), epoch=2)  # a "resumed" run: new dataset object, same epoch
    for x, y in zip(a, b):
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["crop_top_left"], y["crop_top_left"])
    # the decode-and-resize cache changes nothing, whatever epoch filled it
    cached, fresh = make(7), ReferenceDataset(noisy_items, 32, center_crop=False, random_flip=True, seed=7, cache=False)
    _samples(cached, epoch=0)
    for x, y in zip(_samples(cached, epoch=2), _samples(fresh, epoch=2)):
        assert torch.equal(x["pixel_values"], y["pixel_values"])
        assert torch.equal(x["pixel_values"], a[x["index"]]["pixel_values"])
    assert len(cached._cache) == 4 and not fresh._cache
    # order of access does not matter
    ds = make(7)
    ds.set_epoch(2)
    assert torch.equal(ds[3]["pixel_values"], a[3]["pixel_values"])
    # other epochs and seeds give other crops/flips
    key = lambda s: [(tuple(x["crop_top_left"].tolist()), x["pixel_values"].sum().item()) for x in s]  # noqa: E731
    assert key(_samples(make(7), epoch=3)) != key(a)
    assert key(_samples(make(8), epoch=2)) != key(a)


def test_dataloader_workers_see_the_same_samples(noisy_items):
    ds = ReferenceDataset(noisy_items, 32, center_crop=False, random_flip=True, seed=1)
    ds.set_epoch(5)
    direct = collate_references([ds[i] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_references)
    (batch,) = list(loader)
    assert torch.equal(batch["pixel_values"], direct["pixel_values"])


def test_flip_moves_image_and_mask_together(folder):
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = 255  # left half white
    Image.fromarray(a).save(folder / "00.png")
    Image.fromarray(a[..., 0]).save(folder / "m.png")
    write_metadata(folder, {"file_name": "00.png", "caption": "a sks dog", "mask": "m.png"})
    items = scan_references(folder, "sks", "dog")
    ds = ReferenceDataset(items, 32, center_crop=False, random_flip=True)
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        s = ds[0]
        img = (s["pixel_values"][0] > 0).float()
        assert torch.equal(img, (s["mask"][0] > 0.5).float())  # same crop and flip
        top, left = s["crop_top_left"].tolist()
        assert top == 0 and 0 <= left <= 32
        # in the flipped frame the white half is on the right: the crop offset tells how much is visible
        seen.add(bool(img[0, 0]))
    assert seen == {True, False}  # both flipped and unflipped crops occurred


def test_buckets_and_bucket_sampler(folder):
    sizes = [(96, 48), (48, 96), (64, 64), (100, 52), (50, 98)]
    for i, size in enumerate(sizes):
        photo(folder / f"{i}.png", size=size, seed=i)
        (folder / f"{i}.txt").write_text("a sks dog, grass")
    items = scan_references(folder, "sks", "dog")
    buckets = make_buckets(64, step=16)
    ds = ReferenceDataset(items, 64, buckets=buckets)
    assert ds.target_sizes[0] == ds.target_sizes[3] and ds.target_sizes[1] == ds.target_sizes[4]
    assert ds.target_sizes[2] == (64, 64) and ds.target_sizes[0][0] > ds.target_sizes[0][1]
    w, h = ds.target_sizes[0]
    assert ds[0]["pixel_values"].shape == (3, h, w)
    sampler = BucketBatchSampler(ds, batch_size=2, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(5)) and len(sampler) == 3
    for b in batches:
        assert len({ds.target_sizes[i] for i in b}) == 1
    sampler.set_epoch(0)
    assert list(sampler) == batches
    assert len(list(BucketBatchSampler(ds, batch_size=2, drop_last=True))) == 2
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_references)
    assert sum(len(b["index"]) for b in loader) == 5
    with pytest.raises(ValueError, match="BucketBatchSampler"):
        collate_references([ds[0], ds[1]])
