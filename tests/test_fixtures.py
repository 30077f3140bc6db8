"""The tiny offline model families assemble into stock diffusers pipelines that generate images."""

from __future__ import annotations

import pytest
import torch


def test_real_clip_tokenizer(clip_tokenizer):
    assert len(clip_tokenizer) == 49408
    ids = clip_tokenizer("1 sks backpack, girl, park").input_ids
    tokens = clip_tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "1</w>", "sks</w>", "backpack</w>", ",</w>", "girl</w>", ",</w>", "park</w>",
                      "<|endoftext|>"]


@pytest.mark.parametrize("kind, cls", [("sd", "StableDiffusionPipeline"), ("sd-v", "StableDiffusionPipeline"),
                                       ("sdxl", "StableDiffusionXLPipeline"), ("flux", "FluxPipeline"),
                                       ("sd3", "StableDiffusion3Pipeline")])
def test_tiny_pipelines_generate_offline(kind, cls, tiny_model_dir):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(tiny_model_dir(kind))  # the real loading path, offline
    kwargs = {"max_sequence_length": 32} if kind in ("flux", "sd3") else {}
    image = pipe("a sks backpack, girl, park", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0), **kwargs).images
    assert image.shape == (1, 32, 32, 3) and bool((image >= 0).all() and (image <= 1).all())
    if kind == "sd-v":
        assert pipe.scheduler.config.prediction_type == "v_prediction"
