"""Metrics on tiny random-weight models: identities, invariances, masks, loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from accord.errors import ModelLoadError
from accord.eval import models
from accord.eval.metrics import (
    BLIPTextScore,
    CLIPImageSimilarity,
    CLIPTextScore,
    DINOSimilarity,
    FaceSimilarity,
    GramDistance,
    gram_matrix,
)
from accord.eval.tiny import save_tiny_metric_models, tiny_blip, tiny_clip, tiny_dino, tiny_vgg19_features


def _images(n: int, seed: int = 0, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def dino():
    return tiny_dino()


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return tiny_blip(tmp_path_factory.mktemp("blip_vocab"))


@pytest.fixture(scope="module")
def vgg():
    return tiny_vgg19_features()


def test_identical_images_score_100(clip, dino):
    ims = _images(3)
    assert torch.allclose(CLIPImageSimilarity(clip=clip).score(ims[:1], ims[:1]), torch.tensor([100.0]), atol=1e-3)
    assert torch.allclose(DINOSimilarity(dino=dino).score(ims[:1], ims[:1]), torch.tensor([100.0]), atol=1e-3)


def test_real_vit_b32_architecture_identity():
    """The default ViT-B-32 architecture (random weights, built offline) through the same wrapper."""
    import open_clip

    metric = CLIPImageSimilarity(clip=open_clip.create_model("ViT-B-32", pretrained=None))
    im = _images(1)
    assert metric.score(im, im).item() == pytest.approx(100.0, abs=1e-3)


@pytest.mark.parametrize("name", ["clip_t", "clip_i", "dino_i", "blip_t", "gram_d"])
def test_batch_size_and_order_invariance(name, clip, dino, blip, vgg):
    ims, refs = _images(5, seed=1), _images(2, seed=2)
    prompts = ["a dog", "a red cat in the snow", "a sks backpack", "photo of a toy", "a bowl on the beach"]

    def make(batch_size):
        return {
            "clip_t": lambda: CLIPTextScore(clip=clip, batch_size=batch_size),
            "clip_i": lambda: CLIPImageSimilarity(clip=clip, batch_size=batch_size),
            "dino_i": lambda: DINOSimilarity(dino=dino, batch_size=batch_size),
            "blip_t": lambda: BLIPTextScore(blip=blip, batch_size=batch_size),
            "gram_d": lambda: GramDistance(vgg=vgg, batch_size=batch_size, image_size=64),
        }[name]()

    second = prompts if name in ("clip_t", "blip_t") else refs
    a = make(5).score(ims, second)
    perm = [3, 0, 4, 1, 2]
    b = make(2).score([ims[i] for i in perm], [second[i] for i in perm] if second is prompts else second)
    assert torch.allclose(a[perm], b, rtol=1e-4, atol=1e-4)


def test_update_compute_reset(clip):
    metric = CLIPTextScore(clip=clip, batch_size=2)
    ims = _images(3)
    v1 = metric.update(ims[:2], ["a dog", "a cat"])
    v2 = metric.update(ims[2:], ["a toy"])
    assert metric.compute() == pytest.approx(float(torch.cat([v1, v2]).mean()), abs=1e-5)
    metric.reset()
    assert np.isnan(metric.compute())
    with pytest.raises(ValueError, match="prompts"):
        metric.score(ims, ["only one"])


def _square_mask(size=64, box=(16, 16, 48, 48)) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def test_masks_hide_everything_outside_the_subject(clip, dino):
    a, b = _images(2, seed=3)
    # b: same subject (centre square) as a, different surroundings
    b.paste(a.crop((16, 16, 48, 48)), (16, 16))
    ref = _images(1, seed=4)
    mask = _square_mask()
    for metric in (CLIPImageSimilarity(clip=clip), DINOSimilarity(dino=dino)):
        unmasked = metric.score([a, b], ref)
        assert abs(unmasked[0] - unmasked[1]) > 1e-3
        masked = metric.score([a, b], ref, masks=[mask, mask])
        assert masked[0].item() == pytest.approx(masked[1].item(), abs=1e-4)
    # a segmenter callable does the same, for generated images and references alike
    for metric in (CLIPImageSimilarity(clip=clip, segmenter=lambda im: mask),
                   DINOSimilarity(dino=dino, segmenter=lambda im: mask)):
        via_segmenter = metric.score([a, b], ref)
        assert via_segmenter[0].item() == pytest.approx(via_segmenter[1].item(), abs=1e-4)


def test_mask_files_and_reference_masks(clip, tmp_path):
    a, b = _images(2, seed=5)
    mask_path = tmp_path / "m.png"
    _square_mask().save(mask_path)
    metric = CLIPImageSimilarity(clip=clip)
    plain = metric.score([a], [b]).item()
    masked = metric.score([a], [b], masks=[mask_path], reference_masks=[np.asarray(_square_mask()) > 0]).item()
    assert masked != pytest.approx(plain, abs=1e-3)


def test_gram_distance(vgg):
    ims = _images(2, seed=6)
    metric = GramDistance(vgg=vgg, image_size=64)
    assert metric.score(ims[:1], ims[:1]).item() == pytest.approx(0.0, abs=1e-9)
    assert metric.score(ims[:1], ims[1:]).item() > 0
    assert metric.higher_is_better is False


def test_gram_matrix_closed_form():
    f = torch.arange(8.0).reshape(1, 2, 2, 2)  # C=2, H=W=2
    g = gram_matrix(f)
    flat = f.reshape(2, 4)
    assert torch.allclose(g[0], flat @ flat.T / 8)


def test_clip_text_and_blip_scores_are_finite(clip, blip):
    ims = _images(2)
    assert torch.isfinite(CLIPTextScore(clip=clip).score(ims, ["a dog", "a cat"])).all()
    v = BLIPTextScore(blip=blip).score(ims, ["a dog", "a cat"])
    assert v.shape == (2,) and torch.isfinite(v).all() and (v.abs() <= 100).all()


def test_local_folders_load_and_are_cached(tmp_path):
    paths = save_tiny_metric_models(tmp_path)
    models.clear_cache()
    a = CLIPImageSimilarity(str(paths["clip"]), None)
    b = CLIPTextScore(str(paths["clip"]), None)
    assert a.clip is b.clip  # loaded once
    im = _images(1)
    assert a.score(im, im).item() == pytest.approx(100.0, abs=1e-3)
    assert DINOSimilarity(str(paths["dino"])).score(im, im).item() == pytest.approx(100.0, abs=1e-3)
    assert torch.isfinite(BLIPTextScore(str(paths["blip"])).score(im, ["a dog"])).all()
    assert GramDistance(str(paths["vgg"]), image_size=64).score(im, im).item() == pytest.approx(0.0, abs=1e-9)
    models.clear_cache()


@pytest.mark.parametrize(
    "build, names",
    [
        (lambda: CLIPTextScore("ViT-B-32", "openai"), ["CLIP model", "--clip-model"]),
        (lambda: DINOSimilarity("/nonexistent/dino"), ["DINO model", "--dino-model"]),
        (lambda: BLIPTextScore("/nonexistent/blip"), ["BLIP model", "--blip-model"]),
        (lambda: GramDistance("/nonexistent/vgg.pth"), ["VGG19", "--vgg-weights"]),
    ],
)
def test_missing_model_is_one_clear_line(build, names, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.clear_cache()
    with pytest.raises(ModelLoadError) as info:
        build()
    message = str(info.value)
    assert "\n" not in message
    assert all(n in message for n in names)


def test_face_sim_without_insightface_is_a_clear_message(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(ModelLoadError, match=r"pip install 'accord\[face\]'") as info:
        FaceSimilarity()
    assert "\n" not in str(info.value)


def test_face_sim_with_an_injected_embedder():
    ims = _images(3, seed=7)
    table = {id(ims[0]): [1.0, 0.0], id(ims[1]): [1.0, 1.0], id(ims[2]): None}
    metric = FaceSimilarity(embedder=lambda im: table[id(im)])
    v = metric.score([ims[1], ims[2]], [ims[0]])
    assert v[0].item() == pytest.approx(100 / np.sqrt(2), abs=1e-4)
    assert np.isnan(v[1].item())  # no face found
    metric.update([ims[1], ims[2]], [ims[0]])
    assert metric.compute() == pytest.approx(100 / np.sqrt(2), abs=1e-4)  # NaNs skipped
