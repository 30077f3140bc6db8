"""Masked diffusion loss for lora/dreambooth/textual_inversion/custom_diffusion from per-image masks
(metadata.jsonl "mask" or kohya-style data.mask_dir), weighted by data.unmasked_weight outside; masks are
never ignored in silence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import accord.train as train_module
from accord.config import load_config
from accord.data import scan_references
from accord.errors import ConfigError, DataError


def _refs(folder, n=2, masks=None, mask_value=0):
    """n random 40x40 photos with captions; ``masks``: 'metadata' or a mask folder (kohya layout)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text("1 sks backpack, girl")
        mask = Image.new("L", (40, 40), mask_value)
        if masks == "metadata":
            mask.save(folder / f"m{i:02d}.png")
            lines.append(json.dumps({"file_name": f"{i:02d}.png", "mask": f"m{i:02d}.png"}))
        elif masks is not None:
            masks.mkdir(exist_ok=True)
            mask.save(masks / f"{i:02d}.png")
    if lines:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _overrides(model, refs, out, *extra):
    return [f"model.pretrained={model}", f"data.instance_dir={refs}", "data.class_noun=backpack", "data.resolution=32",
            "method.name=lora", "method.lora_rank=4", f"train.output_dir={out}", "train.max_steps=1",
            "train.batch_size=2", "train.checkpoint_every=0", "train.report_to=none", "accord.dd_weight=0", *extra]


def _first_diffusion_loss(overrides) -> float:
    seen = []
    real = train_module.run_step

    def spy(*args, **kwargs):
        losses = real(*args, **kwargs)
        seen.append(float(losses.parts["diffusion"]))
        return losses

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "run_step", spy)
        train_module.train(load_config(None, overrides), progress=False)
    return seen[0]


def test_masked_loss_weighs_the_diffusion_loss_outside_the_mask(model, tmp_path):
    """All-black masks (nothing inside) from data.mask_dir: the first step's diffusion loss is unmasked_weight
    times the unmasked one (same seed, same noise), and 0 at the default weight."""
    refs = _refs(tmp_path / "refs", masks=tmp_path / "masks")
    plain = _first_diffusion_loss(_overrides(model, refs, tmp_path / "plain"))
    masked = ["data.masked_loss=true", f"data.mask_dir={tmp_path / 'masks'}"]
    half = _first_diffusion_loss(_overrides(model, refs, tmp_path / "half", *masked, "data.unmasked_weight=0.5"))
    zero = _first_diffusion_loss(_overrides(model, refs, tmp_path / "zero", *masked))
    assert plain > 0 and half == pytest.approx(0.5 * plain, rel=1e-5) and zero == 0.0


def test_loss_mask_is_one_inside_and_unmasked_weight_outside(model, tmp_path):
    from accord.methods.base import Method

    refs = _refs(tmp_path / "refs", masks="metadata")
    config = load_config(None, _overrides(model, refs, tmp_path / "o", "data.masked_loss=true",
                                          "data.unmasked_weight=0.25"))
    method = Method.__new__(Method)
    method.config = config
    mask = torch.tensor([[[[0.0, 1.0], [0.5, 1.0]]]])
    torch.testing.assert_close(method.loss_mask({"mask": mask}), torch.tensor([[[[0.25, 1.0], [0.625, 1.0]]]]))
    config.data.masked_loss = False
    assert method.loss_mask({"mask": mask}) is None


def test_mask_dir_masks_are_found_by_name_and_conflicts_named(tmp_path):
    refs = _refs(tmp_path / "refs", masks=tmp_path / "masks", mask_value=255)
    items = scan_references(refs, "sks", "backpack", mask_dir=tmp_path / "masks")
    assert [it.mask_path.name for it in items] == ["00.png", "01.png"]
    assert all(it.mask_path.parent == (tmp_path / "masks").resolve() for it in items)
    assert all(it.mask_path is None for it in scan_references(refs, "sks", "backpack"))
    both = _refs(tmp_path / "both", masks="metadata")
    (tmp_path / "other").mkdir()
    Image.new("L", (40, 40), 255).save(tmp_path / "other" / "00.jpg")
    with pytest.raises(DataError, match=r"00\.png: mask given both in .*metadata\.jsonl line 1 and in data\.mask_dir"):
        scan_references(both, "sks", "backpack", mask_dir=tmp_path / "other")
    with pytest.raises(DataError, match="data.mask_dir .* does not exist"):
        scan_references(refs, "sks", "backpack", mask_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("extra,message", [
    (["data.mask_dir=/m"], "data.mask_dir=/m is set but data.masked_loss is off"),
    (["data.masked_loss=true", "data.unmasked_weight=2"], "data.unmasked_weight=2.0 must be in 0..1"),
    (["data.masked_loss=true", "method.name=break_a_scene"], "break_a_scene masks its loss by its per-subject"),
])
def test_bad_mask_settings_are_one_line(extra, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, _overrides("m", tmp_path, tmp_path / "o", *extra))
    assert "\n" not in str(info.value)


def _make_method(config):
    from accord.backbones import load_backbone
    from accord.methods.base import get_method

    backbone = load_backbone(config.model, resolution=config.data.resolution)
    return get_method(config.method.name)(config, backbone)


def test_masks_with_masked_loss_off_warn_how_to_turn_it_on(model, tmp_path):
    refs = _refs(tmp_path / "refs", masks="metadata")
    config = load_config(None, _overrides(model, refs, tmp_path / "o"))
    with pytest.warns(UserWarning, match=r"2 reference image\(s\) .* have a \"mask\" .* set data.masked_loss=true"):
        _make_method(config)


def test_masked_loss_without_any_mask_is_an_error(model, tmp_path):
    refs = _refs(tmp_path / "refs")
    config = load_config(None, _overrides(model, refs, tmp_path / "o", "data.masked_loss=true"))
    with pytest.raises(DataError, match="data.masked_loss is on but no reference image .* has a mask"):
        _make_method(config)
