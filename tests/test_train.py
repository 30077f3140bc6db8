"""The training loop: stock diffusers loads what it writes, resume repeats an uninterrupted run
bit for bit, DDP replicas agree, 'lean' equals 'fast', and bad input gets one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainkit import make_refs, tiny_config

from accord.config import config_to_dict
from accord.errors import AccordError, ConfigError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _write(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "accord.cli", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_lora_run_loads_into_stock_pipeline(model, refs, tmp_path):
    from diffusers import StableDiffusionPipeline

    from accord.train import train

    out = train(tiny_config(model, refs, tmp_path / "run"), progress=False)
    assert json.loads((out / "train_summary.json").read_text())["replicas_identical"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["accord"]["dd_weight"] == 0.2 and saved["train"]["max_steps"] == 3
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    base = pipe("a sks backpack", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    tuned = pipe("a sks backpack", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert tuned.shape == (1, 32, 32, 3)
    assert abs(tuned - base).max() > 0, "the trained LoRA should change the image"


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(model, refs, tmp_path):
    steps = 10
    common = dict(train={"max_steps": steps, "checkpoint_every": 2, "checkpoints_total_limit": None, "batch_size": 2})
    ref_cfg = _write(tiny_config(model, refs, tmp_path / "uninterrupted", **common), tmp_path / "a.yaml")
    run = _cli("train", ref_cfg, "--no-progress")
    assert run.returncode == 0, run.stderr[-2000:]

    cfg = _write(tiny_config(model, refs, tmp_path / "killed", **common), tmp_path / "b.yaml")
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "accord.cli", "train", str(cfg), "--no-progress"], env=ENV,
                            stdout=log, stderr=subprocess.STDOUT)
    marker = tmp_path / "killed" / "checkpoints" / "step-000002" / "state.json"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert not (tmp_path / "killed" / "train_summary.json").exists()

    again = _cli("train", cfg, "--no-progress")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    resumed = _cli("train", cfg, "--resume", "latest", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    final = f"checkpoints/step-{steps:06d}"
    a = load_file(str(tmp_path / "uninterrupted" / final / "trainable.safetensors"))
    b = load_file(str(tmp_path / "killed" / final / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a = load_file(str(tmp_path / "uninterrupted" / final / "optimizer.safetensors"))
    opt_b = load_file(str(tmp_path / "killed" / final / "optimizer.safetensors"))
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)


def test_resume_refuses_a_different_config(model, refs, tmp_path):
    from accord.train import train

    train(tiny_config(model, refs, tmp_path / "run", train={"max_steps": 2, "checkpoint_every": 2}), progress=False)
    changed = tiny_config(model, refs, tmp_path / "run", accord={"dd_weight": 0.3}, train={"max_steps": 4})
    with pytest.raises(ConfigError, match="accord.dd_weight"):
        train(changed, resume="latest", progress=False)


@pytest.mark.slow
def test_ddp_two_processes_end_identical(model, refs, tmp_path):
    cfg = _write(tiny_config(model, refs, tmp_path / "ddp", train={"max_steps": 3, "batch_size": 1}),
                 tmp_path / "d.yaml")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", "-m", "accord.cli", "train", str(cfg), "--no-progress"], env=ENV,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert len(summary["replica_checksums"]) == 2 and summary["replicas_identical"]


def _grads(config, model_dir, refs_dir):
    """Gradients of one micro-batch under the given config (fresh, seeded model)."""
    from accelerate import Accelerator

    from accord.backbones import load_backbone
    from accord.methods import get_method
    from accord.step import TextCache, run_step
    from accord.train import _Batches, _build_data

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    backbone = load_backbone(config.model)
    method = get_method("lora")(config, backbone)
    method.setup()
    _, dataset, _ = _build_data(config, accelerator, backbone)
    batch = _Batches(dataset, 2, 0, 0, 1, 1).get(0, 0)
    calls = []
    backbone.denoiser.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    losses = run_step(config, backbone, method, TextCache(backbone, True), batch, None,
                      torch.Generator().manual_seed(3), "backpack", backward=lambda loss, last: loss.backward() or True)
    grads = {n: p.grad.clone() for n, p in backbone.denoiser.named_parameters() if p.requires_grad}
    return grads, losses, calls


def test_lean_mode_gives_the_fast_mode_gradient(model, refs, tmp_path):
    fast, lf, calls_fast = _grads(tiny_config(model, refs, tmp_path / "f", accord={"dd_weight": 0.3}), model, refs)
    lean, ll, calls_lean = _grads(tiny_config(model, refs, tmp_path / "l", accord={"dd_weight": 0.3, "mode": "lean"}),
                                  model, refs)
    assert torch.allclose(lf.total, ll.total, rtol=1e-5)
    assert calls_fast == [4, 4] and calls_lean == [6, 2, 2]  # batch 2: (2 joint + 2 personal), (2 general + 2 empty)
    for name in fast:
        assert torch.allclose(fast[name], lean[name], rtol=1e-4, atol=1e-7), name
    assert any(g.abs().sum() > 0 for g in fast.values())


@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_dd_without_personal_gradient_stops_only_that_path(mode, model, refs, tmp_path):
    """accord.dd_variant=frozen_personal (an ablation): the same loss value; c_p, c_g and ∅ in one no-grad pass and the
    joint pass with gradient; a gradient that differs from Eq. 8's (no c_p path) and from no DDLoss (the joint path)."""
    def grads(name, **accord):
        return _grads(tiny_config(model, refs, tmp_path / name, accord=accord), model, refs)

    sg, ls, calls = grads("sg", dd_weight=0.3, mode=mode, dd_variant="frozen_personal")
    full, lf, _ = grads("full", dd_weight=0.3)
    plain, _, _ = grads("plain", dd_weight=0.0)
    assert calls == [6, 2]
    assert torch.allclose(ls.total, lf.total, rtol=1e-5)

    def differs(a, b):
        return any(not torch.allclose(a[n], b[n], rtol=1e-3, atol=1e-9) for n in a)

    assert differs(sg, full) and differs(sg, plain)


def test_zero_dd_weight_skips_the_extra_passes(model, refs, tmp_path):
    _, losses, calls = _grads(tiny_config(model, refs, tmp_path / "z", accord={"dd_weight": 0.0}), model, refs)
    assert calls == [2] and "dd" not in losses.parts


def test_nonfinite_losses_stop_the_run_and_keep_the_checkpoint(model, refs, tmp_path):
    from accord.train import train

    config = tiny_config(model, refs, tmp_path / "nan", train={"max_steps": 8, "checkpoint_every": 1,
                                                               "max_nonfinite_steps": 2, "max_grad_norm": 0.0})
    good = {}

    def poison(module, inputs, output):  # step 1 runs two forwards; from the 3rd on (step 2), NaN
        good.setdefault("n", 0)
        good["n"] += 1
        return output if good["n"] <= 2 else (output[0] * float("nan"),) + tuple(output[1:])

    from accord import train as train_module

    original = train_module.load_backbone

    def patched(*args, **kwargs):
        backbone = original(*args, **kwargs)
        backbone.denoiser.register_forward_hook(poison)
        return backbone

    train_module.load_backbone = patched
    try:
        with pytest.raises(AccordError, match="2 non-finite losses in a row at step 3.*step-000001"):
            train(config, progress=False)
    finally:
        train_module.load_backbone = original
    ckpt = tmp_path / "nan" / "checkpoints" / "step-000001"
    state = load_file(str(ckpt / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.name=lorra", "method.name='lorra' is not allowed; choose one of"),
        ("model.backbone=flux2", "model.backbone='flux2' is not allowed"),
        ("model.prediction_type=eps", "model.prediction_type='eps' is not allowed"),
        ("train.learning_rat=1", "unknown config key 'train.learning_rat' (did you mean 'learning_rate'?)"),
        ("accord.dd_weight=-1", "accord.dd_weight=-1.0 is negative"),
        ("train.batch_size=two", "train.batch_size='two' is not a valid int"),
    ],
)
def test_bad_config_is_one_line(model, refs, tmp_path, override, message):
    cfg = _write(tiny_config(model, refs, tmp_path / "x"), tmp_path / "c.yaml")
    run = _cli("train", cfg, "--set", override)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr


@pytest.mark.slow
def test_bad_data_is_one_line(model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    nocap = tmp_path / "nocap"
    make_refs(nocap, captions=["a backpack on a table", "1 sks backpack, girl"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "00.jpg").write_bytes(b"")
    for folder, message in [(empty, "no images"), (nocap, "00.txt"), (tmp_path / "broken", "00.jpg")]:
        cfg = _write(tiny_config(model, folder, tmp_path / "o"), tmp_path / "c.yaml")
        run = _cli("train", cfg, "--no-progress")
        assert run.returncode == 2, run.stderr[-1500:]
        lines = [ln for ln in run.stderr.strip().splitlines() if ln.startswith("accord train:")]
        assert len(lines) == 1 and message in lines[0], run.stderr[-1500:]
        assert "Traceback" not in run.stderr


def test_missing_model_offline_is_one_line(refs, tmp_path):
    cfg = tiny_config(tmp_path / "nope", refs, tmp_path / "o")
    cfg.model.pretrained = "some-user/not-downloaded-model"
    run = _cli("train", _write(cfg, tmp_path / "c.yaml"), "--no-progress")
    assert run.returncode == 2
    assert "HF_HUB_OFFLINE" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_loop_options_run_together(model, refs, tmp_path):
    """Accumulation, logit-normal timesteps, min-SNR, noise offset, checkpointing, bf16 autocast,
    cached latents, validation grids and TensorBoard logs in one short run."""
    from accord.train import train

    config = tiny_config(model, refs, tmp_path / "opts", train={
        "max_steps": 2, "batch_size": 1, "gradient_accumulation_steps": 2, "timestep_sampling": "logit_normal",
        "snr_gamma": 5.0, "noise_offset": 0.05, "gradient_checkpointing": True, "mixed_precision": "bf16",
        "cache_latents": True, "validation_every": 2, "validation_prompts": ["a {trigger} {class_noun}"],
        "validation_steps": 2, "report_to": "tensorboard", "lr_scheduler": "cosine", "lr_warmup_steps": 1})
    out = train(config, progress=False)
    assert (out / "samples" / "step-000002.png").is_file()
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard event file expected"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("loss", "diffusion", "dd", "dependence_shift", "lr"):
        assert tag in tags, tags
    assert all(torch.isfinite(v).all()
               for v in load_file(str(out / "checkpoints/step-000002/trainable.safetensors")).values())


def test_lora_with_text_encoder(model, refs, tmp_path):
    """Text-encoder LoRA trains (its lora_B leaves zero) and is written in both formats."""
    from accord.train import train

    out = train(tiny_config(model, refs, tmp_path / "te", method={"train_text_encoder": True},
                            train={"max_steps": 2}), progress=False)
    diffusers_keys = load_file(str(out / "pytorch_lora_weights.safetensors"))
    text = {k: v for k, v in diffusers_keys.items() if k.startswith("text_encoder.")}
    assert text and all(v.abs().sum() > 0 for k, v in text.items() if k.endswith("up.weight"))
    kohya = load_file(str(out / "lora_kohya.safetensors"))
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in kohya)
    assert any(k.startswith("lora_unet_") for k in kohya)


@pytest.mark.slow
def test_sdxl_buckets_feed_each_sample_its_size_conditioning(tiny_model_dir, tmp_path):
    """Aspect-ratio buckets batch same-size images; SDXL time ids carry each sample's original size
    and crop instead of a fixed square."""
    from PIL import Image

    import accord.step as step_module
    from accord.train import train

    refs = make_refs(tmp_path / "refs")
    wide = Image.open(refs / "00.jpg")
    wide.crop((0, wide.height // 4, wide.width, wide.height * 3 // 4)).save(refs / "00.jpg")  # 2:1
    seen = []
    original = step_module._with_size

    def spy(cond, size_cond):
        if size_cond is not None:
            seen.append(size_cond.clone())
        return original(cond, size_cond)

    step_module._with_size = spy
    try:
        config = tiny_config(tiny_model_dir("sdxl"), refs, tmp_path / "xl", data={"buckets": True, "resolution": 64},
                             train={"max_steps": 3, "batch_size": 2})
        train(config, progress=False)
    finally:
        step_module._with_size = original
    rows = torch.cat(seen)
    assert rows.shape[1] == 6
    targets = {tuple(r[4:].tolist()) for r in rows}
    assert len(targets) >= 2, f"expected a wide and a square bucket, got {targets}"
    assert any(r[1] > r[0] for r in rows), "the 2:1 image's original size is wider than tall"


def test_lora_alpha_survives_the_stock_loader(model, refs, tmp_path):
    """alpha ≠ rank: the stock loader must apply the same scale the trained model had."""
    from diffusers import StableDiffusionPipeline

    from accord.train import train

    out = train(tiny_config(model, refs, tmp_path / "alpha", method={"lora_rank": 4, "lora_alpha": 16},
                            train={"max_steps": 2}), progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    scales = {m.scaling["default_0"] for m in pipe.unet.modules() if hasattr(m, "scaling") and m.scaling}
    assert scales == {4.0}, scales  # alpha / rank
    kohya = load_file(str(out / "lora_kohya.safetensors"))
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {16.0}


def test_lean_mode_with_accumulation_steps_as_fast_mode(model, refs, tmp_path):
    """Both schedules divide each backward by the accumulation count: one Trainer.step under plain SGD (lr 1, no
    clipping, so the update is the summed gradient itself) moves the weights the same in both modes."""
    from accelerate import Accelerator

    from accord.train import Trainer, _Batches, _build_data, build_model

    def update(mode):
        config = tiny_config(model, refs, tmp_path / mode, accord={"dd_weight": 0.3, "mode": mode},
                             train={"batch_size": 1, "gradient_accumulation_steps": 2, "max_grad_norm": 0})
        accelerator = Accelerator(cpu=True)
        backbone, method = build_model(config, accelerator)
        _, dataset, _ = _build_data(config, accelerator, backbone, method)
        optimizer = torch.optim.SGD(method.parameters(), lr=1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        trainer = Trainer(config, accelerator, backbone, method, optimizer, schedule, _Batches(dataset, 1, 0, 0, 1, 2))
        before = [p.detach().clone() for p in method.parameters()]
        assert trainer.step(0) is not None
        return [b - p.detach() for b, p in zip(before, method.parameters())]

    fast, lean = update("fast"), update("lean")
    largest = max(float(d.abs().max()) for d in fast)
    assert largest > 0
    for a, b in zip(fast, lean):  # a missing 1/accumulation would double lean's update
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * largest)
