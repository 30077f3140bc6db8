"""IP-Adapter with ACCORD (paper Tab. 5): two steps on tiny SD from an image–caption folder; only the
adapter trains; stock ``load_ip_adapter`` reads the output and generates; 2-process DDP replicas agree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from trainkit import photo, tiny_config

from accord.config import config_to_dict

CAPTIONS = ["a backpack, on a table, kitchen", "a backpack, girl, park", "a backpack, street", "a backpack, grass"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from accord.testing.tiny import save_tiny_image_encoder

    return save_tiny_image_encoder(tmp_path_factory.mktemp("clip_vision") / "enc")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    for i, caption in enumerate(CAPTIONS):
        shutil.copy(photo("backpack", i), folder / f"{i:02d}.jpg")
        (folder / f"{i:02d}.txt").write_text(caption)
    return folder


def _config(model, pairs, encoder_dir, out, **train):
    return tiny_config(model, pairs, out, method={"name": "ip_adapter", "image_encoder": str(encoder_dir)},
                       data={"class_noun": "backpack"}, accord={"dd_weight": 0.2, "pd_weight": 0.002},
                       train={"max_steps": 2, **train})


def test_only_the_adapter_gets_gradient(tiny_model_dir, pairs, encoder_dir, tmp_path):
    from accelerate import Accelerator

    from accord.backbones import load_backbone
    from accord.methods import get_method
    from accord.step import TextCache, run_step
    from accord.train import _Batches, _build_data

    config = _config(tiny_model_dir("sd"), pairs, encoder_dir, tmp_path / "g")
    backbone = load_backbone(config.model)
    method = get_method("ip_adapter")(config, backbone)
    method.setup()
    _, dataset, _ = _build_data(config, Accelerator(cpu=True), backbone, method)
    batch = _Batches(dataset, 2, 0, 0, 1, 1).get(0, 0)
    losses = run_step(config, backbone, method, TextCache(backbone, True), batch, None,
                      torch.Generator().manual_seed(0), "backpack", backward=lambda loss, last: loss.backward() or True)
    assert {"dd", "pd", "diffusion"} <= set(losses.parts)
    grads = {n for n, p in backbone.denoiser.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("encoder_hid_proj" in n or "_ip." in n for n in grads), sorted(grads)[:5]
    assert all(p.grad is None for e in backbone.text_encoders for p in e.parameters())


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_ip_adapter_trains_and_loads_with_stock_diffusers(kind, tiny_model_dir, pairs, encoder_dir, tmp_path):
    import diffusers
    from PIL import Image
    from safetensors.torch import load_file

    from accord.methods.ip_adapter import IP_FILE
    from accord.testing.tiny import tiny_image_encoder
    from accord.train import train

    model = tiny_model_dir(kind)
    out = train(_config(model, pairs, encoder_dir, tmp_path / "out"), progress=False)
    state = load_file(str(out / IP_FILE))
    assert {k.split(".")[0] for k in state} == {"image_proj", "ip_adapter"}
    pipeline = {"sd": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline}[kind]
    pipe = pipeline.from_pretrained(str(model), image_encoder=tiny_image_encoder())
    assert state["image_proj.proj.weight"].shape == (4 * pipe.unet.config.cross_attention_dim, 32)
    cross = [n for n in pipe.unet.attn_processors if n.endswith("attn2.processor")]
    assert (sorted({int(k.split(".")[1]) for k in state if k.startswith("ip_adapter.")})
            == list(range(1, 2 * len(cross), 2)))
    pipe.load_ip_adapter(str(out), subfolder="", weight_name=IP_FILE)
    loaded = pipe.unet.encoder_hid_proj.image_projection_layers[0].image_embeds.weight
    assert torch.equal(loaded, state["image_proj.proj.weight"])
    image = pipe("a backpack on a beach", ip_adapter_image=Image.open(photo("backpack", 4)),
                 num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
    # the run names its image encoder, and its README's lines (which pass it) load the adapter as written
    from trainkit import run_readme

    info = json.loads((out / "ip_adapter.json").read_text())
    assert (info["image_encoder_path"] == str(encoder_dir.resolve())
            and info["image_encoder_path"] in (out / "README.md").read_text())
    readme_pipe = run_readme(out)["pipe"]
    assert readme_pipe.image_encoder is not None
    assert torch.equal(readme_pipe.unet.encoder_hid_proj.image_projection_layers[0].image_embeds.weight,
                       state["image_proj.proj.weight"])


@pytest.mark.slow
def test_ip_adapter_ddp_two_processes_end_identical(tiny_model_dir, pairs, encoder_dir, tmp_path):
    config = _config(tiny_model_dir("sd"), pairs, encoder_dir, tmp_path / "ddp", batch_size=1)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", "-m", "accord.cli", "train", str(path), "--no-progress"], env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["replicas_identical"]
