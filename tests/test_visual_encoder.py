"""VisualEncoder (paper App. N): two ACCORD steps on tiny SD/SDXL; only the MLP trains; the output
loads on a stock pipeline and generates from a new reference."""

from __future__ import annotations

import json

import pytest
import torch
from trainkit import make_refs, photo, tiny_config

from accord.train import train


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from accord.testing.tiny import save_tiny_image_encoder

    return save_tiny_image_encoder(tmp_path_factory.mktemp("clip_vision") / "enc")


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    return make_refs(tmp_path_factory.mktemp("refs") / "backpack")


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.slow
def test_visual_encoder_trains_loads_and_generates(kind, tiny_model_dir, encoder_dir, refs, tmp_path):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from accord.inference import load_trained
    from accord.methods.visual_encoder import VE_FILE, generate_with_reference

    model = tiny_model_dir(kind)
    cfg = tiny_config(model, refs, tmp_path / "out",
                      method={"name": "visual_encoder", "image_encoder": str(encoder_dir)},
                      accord={"dd_weight": 0.2, "pd_weight": 0.002}, train={"max_steps": 2, "checkpoint_every": 1})
    out = train(cfg, progress=False)

    weights = load_file(str(out / VE_FILE))
    assert weights["mlp.2.weight"].shape == (4 * (32 if kind == "sd" else 64), 32)
    info = json.loads((out / "visual_encoder.json").read_text())
    assert info["num_tokens"] == 4 and info["family"] == kind
    # only the MLP changed: the step-1 checkpoint holds MLP tensors only, and they differ from the final ones
    ckpt = load_file(str(out / "checkpoints" / "step-000001" / "trainable.safetensors"))
    assert ckpt and all(k.startswith("m0.") for k in ckpt)
    assert any(not torch.equal(ckpt[f"m0.{k}"], v) for k, v in weights.items())
    base = DiffusionPipeline.from_pretrained(str(model))
    pipe = load_trained(out)
    for (name, p), (_, q) in zip(base.unet.state_dict().items(), pipe.unet.state_dict().items()):
        assert torch.equal(p, q), name
    image = generate_with_reference(pipe, photo("backpack", 4), "1 sks backpack, beach",
                                    num_inference_steps=2, height=32, width=32, output_type="np",
                                    generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3)
    assert torch.isfinite(torch.from_numpy(image)).all()


@pytest.mark.slow
def test_stock_recipe_in_the_docs_matches_generate_with_reference(tiny_model_dir, encoder_dir, refs, tmp_path):
    """docs/image-encoders.md's accord-free recipe (stock pipeline + prompt_embeds), run as written, draws the
    image accord's ``generate_with_reference`` draws."""
    import re
    from pathlib import Path

    import numpy as np
    from diffusers import StableDiffusionPipeline

    from accord.methods.visual_encoder import VisualEncoder, generate_with_reference

    model = tiny_model_dir("sd")
    cfg = tiny_config(model, refs, tmp_path / "out",
                      method={"name": "visual_encoder", "image_encoder": str(encoder_dir)}, train={"max_steps": 2})
    out = train(cfg, progress=False)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "image-encoders.md").read_text()
    snippet = re.search(r"<!-- stock-recipe -->\n```python\n(.*?)```", doc, re.S).group(1)
    fast = "num_inference_steps=3, height=32, width=32"  # the recipe as written, at a test's sampling budget
    assert snippet.count("num_inference_steps=50") == 1
    snippet = snippet.replace("num_inference_steps=50", fast)
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    scope = {"OUT": str(out), "REFERENCE": str(photo("backpack", 4)), "PROMPT": "1 sks backpack, beach",
             "pipe": pipe}
    exec(compile(snippet, "image-encoders.md", "exec"), scope)
    VisualEncoder.load_into(pipe, out)
    expected = generate_with_reference(pipe, scope["REFERENCE"], scope["PROMPT"], num_inference_steps=3, height=32,
                                       width=32, guidance_scale=7.5,
                                       generator=torch.Generator().manual_seed(0)).images[0]
    a, b = np.asarray(scope["image"], dtype=int), np.asarray(expected, dtype=int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    # the tokens matter: the same call without them draws another image
    plain = pipe("1 sks backpack, beach", num_inference_steps=3, height=32, width=32, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(np.asarray(plain, dtype=int) - b).max() > 1
