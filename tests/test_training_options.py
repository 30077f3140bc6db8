"""Issue 20's training options, each shown to change what it claims on the tiny fixtures: flow timesteps,
optimizers, caption dropout/shuffling, LoRA variants, several instance folders, quantization, EMA and logging."""

from __future__ import annotations

import re

import pytest
import torch
from trainkit import tiny_config

from accord.errors import ConfigError


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
    config = tiny_config(model, refs, tmp_path / "o",
                         train={"optimizer": name, "learning_rate": 1.0 if name == "prodigy" else 1e-2})
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


@pytest.mark.parametrize("method, key, lr", [("lora", "text_encoder_lr", 3e-3),
                                             ("textual_inversion", "embedding_lr", 5e-2)])
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
    ({"use_8bit_adam": True, "optimizer": "prodigy"},
     "train.use_8bit_adam=true conflicts with train.optimizer=prodigy"),
    ({"optimizer": "adamw_schedulefree", "lr_scheduler": "cosine"}, "set train.lr_scheduler=constant"),
    ({"text_encoder_lr": 0.0}, "train.text_encoder_lr=0.0 must be a positive learning rate"),
    ({"optimizer": "sgd"}, "train.optimizer='sgd' is not allowed"),
])
def test_bad_optimizer_keys_are_one_line(keys, message, model, refs, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        tiny_config(model, refs, tmp_path / "t", train=keys)
    _one_line(err)


# ---------------------------------------------------------------------------- 3. captions


def _dataset(refs, **options):
    from accord.data.references import ReferenceDataset, scan_references

    return ReferenceDataset(scan_references(refs, "sks", "backpack"), 32, seed=0, **options)


def test_caption_dropout_empties_caption_and_general_only(refs):
    plain, dropping = _dataset(refs), _dataset(refs, caption_dropout=0.5)
    dropped = []
    for epoch in range(40):
        plain.set_epoch(epoch)
        dropping.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], dropping[i]
            assert torch.equal(a["pixel_values"], b["pixel_values"])  # crops and flips draw as before
            dropped.append(bool(b["caption_dropped"]))
            if b["caption_dropped"]:
                assert b["caption"] == "" and b["general"] == "" and b["personal"] == a["personal"]
            else:
                assert (b["caption"], b["general"]) == (a["caption"], a["general"])
    assert 0.35 < sum(dropped) / len(dropped) < 0.65
    dropping.set_epoch(7)
    again = _dataset(refs, caption_dropout=0.5)
    again.set_epoch(7)
    assert [dropping[i]["caption"] for i in range(4)] == [again[i]["caption"] for i in range(4)]  # seeded: resumable


def test_shuffle_phrases_keeps_the_trigger_phrase_first(refs, tmp_path):
    from trainkit import make_refs

    folder = make_refs(tmp_path / "long", captions=["1 sks backpack, girl, park, sunset, bench, tree"] * 2)
    for keep in (0, 2):
        data = _dataset(folder, shuffle_phrases=True, keep_phrases=keep)
        orders = set()
        for epoch in range(12):
            data.set_epoch(epoch)
            s = data[0]
            phrases = s["caption"].split(", ")
            assert phrases[0] == "1 sks backpack" and s["personal"] == "1 sks backpack"
            assert sorted(phrases[1:]) == sorted(["girl", "park", "sunset", "bench", "tree"])
            assert s["general"] == ", ".join(phrases[1:])  # c_g follows the shuffled order
            assert phrases[1:1 + keep] == ["girl", "park"][:keep]
            orders.add(s["caption"])
        assert len(orders) > 3, "phrases should be shuffled across epochs"


def test_dropped_captions_carry_no_dd_term_and_are_logged(model, refs, tmp_path, caplog):
    import logging

    from test_train import _grads

    from accord.data.folders import caption_options

    config = tiny_config(model, refs, tmp_path / "c", data={"caption_dropout": 0.6}, accord={"dd_weight": 0.2})
    with caplog.at_level(logging.INFO, logger="accord.data"):
        caption_options(config.data)
    assert "carry no DD term" in caplog.text and "captions_dropped" in caplog.text
    from accord.train import _Batches, _build_data

    picked: dict[int, tuple] = {}  # one seed per number of captions its first batch drops
    for seed in range(20):
        config.train.seed = seed
        _, dataset, _ = _build_data(config, None, None)
        batch = _Batches(dataset, 2, 0, 0, 1, 1).get(0, 0)  # as _grads draws it
        picked.setdefault(int(batch["caption_dropped"].sum()), (seed, batch))
    assert len(picked) > 1
    for n, (seed, batch) in sorted(picked.items())[:2]:
        config.train.seed = seed
        _, losses, calls = _grads(config, model, refs)
        assert int(losses.parts["captions_dropped"]) == n
        with_dd = sum(1 for g in batch["general"] if g)  # a dropped caption has no c_g
        # fast mode: one forward of (2 joint + the DD rows' personal), then their general + empty (none without DD rows)
        assert calls[0] == 2 + with_dd and len(calls) == (2 if with_dd else 1)


@pytest.mark.parametrize("keys, message", [
    ({"caption_dropout": 1.0}, "data.caption_dropout=1.0 is not a probability below 1"),
    ({"keep_phrases": -1}, "data.keep_phrases=-1 is negative"),
])
def test_bad_caption_keys_are_one_line(keys, message, model, refs, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        tiny_config(model, refs, tmp_path / "t", data=keys)
    _one_line(err)


# ---------------------------------------------------------------------------- 4. several folders


def test_instance_dirs_repeat_weight_and_split_by_their_own_trigger(model, refs, tmp_path):
    from trainkit import make_refs

    from accord.data.folders import scan_instance_dirs
    from accord.train import _build_data

    dog = make_refs(tmp_path / "dog", subject="dog", captions=["a zwx dog, grass", "a zwx dog"])
    config = tiny_config(model, refs, tmp_path / "o", data={
        "instance_dir": "", "instance_dirs": [
            {"path": str(refs), "repeats": 2},
            {"path": str(dog), "trigger": "zwx", "class_noun": "dog", "weight": 0.5},
        ]})
    items = scan_instance_dirs(config.data)
    assert len(items) == 2 * 4 + 2
    assert [it.personal for it in items[-2:]] == ["a zwx dog", "a zwx dog"] and items[-2].general == "grass"
    assert [it.weight for it in items] == [1.0] * 8 + [0.5] * 2
    _, dataset, _ = _build_data(config, None, None)
    assert len(dataset) == 10 and float(dataset[9]["loss_weight"]) == 0.5 and float(dataset[0]["loss_weight"]) == 1.0


def test_folder_weight_scales_its_diffusion_loss(model, refs, tmp_path):
    from test_train import _grads

    plain = tiny_config(model, refs, tmp_path / "a", accord={"dd_weight": 0.0})
    weighted = tiny_config(model, refs, tmp_path / "b", accord={"dd_weight": 0.0},
                           data={"instance_dir": "", "instance_dirs": [{"path": str(refs), "weight": 0.25}]})
    _, a, _ = _grads(plain, model, refs)
    _, b, _ = _grads(weighted, model, refs)
    assert float(b.parts["diffusion"]) == pytest.approx(0.25 * float(a.parts["diffusion"]), rel=1e-5)


@pytest.mark.parametrize("dirs, extra, message", [
    ([{"path": "x", "repeats": 0}], {}, "data.instance_dirs[0].repeats=0 must be a whole number >= 1"),
    ([{"path": "x", "weight": -1}], {}, "data.instance_dirs[0].weight=-1 must be a positive number"),
    ([{"path": "x", "repeat": 2}], {}, "data.instance_dirs[0]: unknown key 'repeat'"),
    ([{"repeats": 2}], {}, "data.instance_dirs[0].path is missing"),
    ([{"path": "x", "trigger": "zwx"}], {"accord": {"pd_weight": 0.001}},
     "data.instance_dirs: accord.pd_weight uses the single data.trigger/data.class_noun"),
])
def test_bad_instance_dirs_are_one_line(dirs, extra, message, model, refs, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        tiny_config(model, refs, tmp_path / "t", data={"instance_dirs": dirs}, **extra)
    _one_line(err)
