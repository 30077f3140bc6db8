"""What ACCORD's DDLoss costs per training step: step time (and, on CUDA, peak memory) of each method
with and without ACCORD, in one run.

Variants, all timed on the same model objects, the same fixed batch and the same optimizer:

  plain     a stock diffusers training step written inline below (as in diffusers'
            examples/dreambooth/train_dreambooth_lora.py with --pre_compute_text_embeddings: VAE encode,
            noise, ``noise_scheduler.add_noise``, UNet forward, MSE on the target, backward, clip,
            AdamW step); the reference the others are compared with
  off       accord's step with accord.dd_weight=0 (``accord.train.Trainer.step``, what ``train()``'s loop runs)
  fast      accord.dd_weight=0.2, accord.mode=fast (the default)
  lean      accord.dd_weight=0.2, accord.mode=lean
  fast-dd1  accord.dd_weight=0.2, mode=fast, accord.dd_batch=1 (DD term on one sample of the batch)
  fast-share  fast, measuring DDLoss's gradient share on every step (what accord.grad_share_every=N costs on
            one step in N: the ratio to fast, minus 1, divided by N)

Variants run round-robin (``--rounds`` rounds of ``--steps`` steps each, after ``--warmup`` steps of
each), and the median step time per variant is reported, so machine load falls on all of them alike.
Peak memory (CUDA only) is ``torch.cuda.max_memory_allocated`` with the counter reset before each
variant's block; weights, gradients-to-be and optimizer state are shared, so ratios compare like with like.

Modes:
  default (no --real)  the tiny random SD model of ``accord.testing.tiny`` (1.4 M-parameter UNet, real VAE
                       and CLIP text encoder code paths), batch 4, 32 px; methods lora and dreambooth.
                       Runs on the CPU in about a minute; absolute times mean little, ratios are indicative.
                       ``--cases`` picks other tiny cases (``--cases all``: every one, several minutes):
                       textual_inversion, custom_diffusion, visual_encoder, ip_adapter (tiny SD; the image
                       methods with a tiny random CLIP image encoder) and flux-lora (LoRA on the tiny FLUX
                       fixture). FLUX has no UNet step to compare with, so its cases skip (a) and report
                       against (b) only.
  --real (CUDA)        real-size UNets from the public SD1.5 and SDXL configs written below, random weights
                       (weights do not change speed or memory), bf16 autocast, AdamW, batch 4:
                       SD1.5 full fine-tune (dreambooth) at 64x64 latents and SDXL LoRA rank 64 on
                       to_q/to_k/to_v/to_out.0 at 128x128 latents. The VAE and text encoders are NOT run:
                       a stand-in backbone (``LatentBackbone``) takes the fixed batch's latents as they are and
                       returns fixed random text-encoder outputs of the right shapes per prompt. Both are frozen
                       and accord caches text encodings anyway, so what is measured is the UNet work, the loss
                       and the optimizer; the plain reference skips them in the same way.

Usage:
  python benchmarks/overhead.py                       # CPU/tiny (or tiny on CUDA when one is present)
  python benchmarks/overhead.py --cases ip_adapter flux-lora   # other tiny cases (--cases all: every one)
  python benchmarks/overhead.py --real                # GPU, real-size configs
  python benchmarks/overhead.py --append-results      # also append a dated section to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import hashlib
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from accord.backbones.base import Backbone  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
VARIANTS = ("plain", "off", "fast", "lean", "fast-dd1", "fast-share")
LABELS = {
    "plain": "(a) plain diffusers step",
    "off": "(b) accord, dd_weight=0",
    "fast": "(c) accord DDLoss, mode=fast",
    "lean": "(d) accord DDLoss, mode=lean",
    "fast-dd1": "(e) accord DDLoss, fast, dd_batch=1",
    "fast-share": "(f) accord DDLoss, fast, gradient share measured",
}
DD_WEIGHT = 0.2
GENERAL_WORDS = ["girl", "park", "street", "table", "kitchen", "dog", "beach", "snow", "forest", "man", "car", "sofa"]

# ---------------------------------------------------------------------------- real-size configs (public, inline)

# runwayml/stable-diffusion-v1-5 unet/config.json (the fields that shape the network)
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), center_input_sample=False,
    cross_attention_dim=768, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "DownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280), center_input_sample=False,
    cross_attention_dim=2048, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4,
    projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=(1, 2, 10), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
)
# both models train on this DDPM grid (scaled_linear 0.00085..0.012, 1000 steps, epsilon)
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                   prediction_type="epsilon", clip_sample=False)


@dataclasses.dataclass
class Case:
    """One benchmarked (backbone, method) pair."""

    name: str
    method: str
    kind: str  # "tiny-sd" | "tiny-flux" | "sd15" | "sdxl"
    batch: int
    size: int  # pixels for tiny-sd, latent side for sd15/sdxl
    lora_rank: int = 16
    mixed_precision: str = "no"
    unet: dict | None = None  # overrides the real config (used by the tests to shrink the real path)
    trigger: str = "sks"  # the learned token of textual_inversion / custom_diffusion

    @property
    def has_plain(self) -> bool:
        """(a) is a UNet step; the flow transformers (FLUX) are compared with (b) only."""
        return self.kind != "tiny-flux"


#: the tiny cases ``--cases`` picks from: name -> (method, kind, trigger); default "lora dreambooth"
TINY_CASES = {
    "lora": ("lora", "tiny-sd", "sks"),
    "dreambooth": ("dreambooth", "tiny-sd", "sks"),
    "textual_inversion": ("textual_inversion", "tiny-sd", "<s*>"),
    "custom_diffusion": ("custom_diffusion", "tiny-sd", "<new1>"),
    "visual_encoder": ("visual_encoder", "tiny-sd", "sks"),
    "ip_adapter": ("ip_adapter", "tiny-sd", "sks"),
    "flux-lora": ("lora", "tiny-flux", "sks"),
}
DEFAULT_CASES = ("lora", "dreambooth")
IMAGE_METHODS = ("visual_encoder", "ip_adapter")


def tiny_cases(names, batch: int, size: int) -> list[Case]:
    unknown = [n for n in names if n not in TINY_CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(TINY_CASES)} or all")
    out = []
    for n in names:
        method, kind, trigger = TINY_CASES[n]
        label = f"tiny FLUX {method}" if kind == "tiny-flux" else f"tiny SD {method}"
        out.append(Case(label, method, kind, batch, size, lora_rank=4, trigger=trigger))
    return out


def real_cases(methods=None) -> list[Case]:
    cases = [Case("SD1.5 full fine-tune (dreambooth)", "dreambooth", "sd15", 4, 64, mixed_precision="bf16"),
             Case("SDXL LoRA-64", "lora", "sdxl", 4, 128, lora_rank=64, mixed_precision="bf16")]
    return [c for c in cases if methods is None or c.method in methods]


# ---------------------------------------------------------------------------- the stand-in backbone (--real)


class LatentBackbone(Backbone):  # device, frozen_modules, check_config, ... from the base
    """A real-size UNet without VAE and text encoders (both frozen; not what is measured).

    ``encode_images`` returns its input: the fixed batch's ``pixel_values`` already hold latents.
    ``encode_prompts`` returns fixed random text-encoder outputs of the real shapes, the same tensor for the same
    prompt (SD1.5: [n, 77, 768]; SDXL: [n, 77, 2048] + pooled [n, 1280] + time ids).
    """

    def __init__(self, family: str, unet, noise_scheduler, resolution: int):
        from accord.losses import Parameterization

        self.family, self.denoiser, self.vae = family, unet, None
        self.text_encoders, self.tokenizers = [], []
        self.noise_scheduler = noise_scheduler
        self.parameterization = Parameterization(noise_scheduler)
        self.resolution = resolution
        self.prompt_transform = None
        self.source = f"random {family} UNet"

    def _random(self, prompt: str, *shape) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    def encode_prompts(self, prompts):
        from accord.backbones import Conditioning

        prompts = self.prepare_prompts(prompts)
        dtype = next(self.denoiser.parameters()).dtype
        width = self.denoiser.config.cross_attention_dim
        embeds = torch.stack([self._random(p, 77, width) for p in prompts]).to(self.device, dtype)
        if self.family != "sdxl":
            return Conditioning(embeds=embeds)
        c = self.denoiser.config
        pooled_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim  # 1280 for SDXL
        pooled = torch.stack([self._random("pooled:" + p, pooled_dim) for p in prompts]).to(self.device, dtype)
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=dtype, device=self.device).repeat(len(prompts), 1)
        return Conditioning(embeds=embeds, pooled=pooled, time_ids=time_ids)

    def encode_images(self, pixel_values, generator=None):
        return pixel_values

    def predict(self, noisy, timesteps, cond):
        if self.family == "sdxl":
            added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
            return self.denoiser(noisy, timesteps, encoder_hidden_states=cond.embeds, added_cond_kwargs=added,
                                 return_dict=False)[0]
        return self.denoiser(noisy, timesteps, encoder_hidden_states=cond.embeds, return_dict=False)[0]


# ---------------------------------------------------------------------------- building (as train() does)


_ENCODER_DIR: list[Path] = []


def _tiny_image_encoder() -> str:
    """A tiny random CLIPVisionModelWithProjection written once per process (visual_encoder, ip_adapter)."""
    if not _ENCODER_DIR:
        import atexit
        import shutil
        import tempfile

        from accord.testing.tiny import save_tiny_image_encoder

        root = Path(tempfile.mkdtemp(prefix="accord-bench-"))
        atexit.register(shutil.rmtree, root, True)
        _ENCODER_DIR.append(save_tiny_image_encoder(root / "image_encoder"))
    return str(_ENCODER_DIR[0])


def _config(case: Case, device: str):
    import dataclasses

    from accord.config import config_from_dict
    from accord.methods import get_method

    method = {"name": case.method, "lora_rank": case.lora_rank}
    if case.method in IMAGE_METHODS:
        method.update(image_encoder=_tiny_image_encoder(), image_dropout=0.0, text_dropout=0.0, both_dropout=0.0)
    keys = {f.name for f in dataclasses.fields(get_method(case.method).options)}
    method = {k: v for k, v in method.items() if k in keys}  # each method takes only its own keys
    tiny = case.kind.startswith("tiny")
    return config_from_dict({
        "model": {"pretrained": "benchmark"},
        "data": {"instance_dir": "benchmark", "class_noun": "backpack", "trigger": case.trigger,
                 "resolution": case.size if tiny else 8 * case.size},
        "method": method,
        "accord": {"dd_weight": 0.0},
        "train": {"mixed_precision": case.mixed_precision, "report_to": "none", "learning_rate": 1e-5},
    })


def _build_backbone(case: Case, device: torch.device):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if case.kind == "tiny-sd":
        from accord.backbones.stable_diffusion import StableDiffusionBackbone
        from accord.testing.tiny import build_pipeline

        pipe = build_pipeline("sd")
        return StableDiffusionBackbone(pipe, DDPMScheduler.from_config(pipe.scheduler.config), "tiny sd")
    if case.kind == "tiny-flux":
        from accord.backbones.flux import FluxBackbone
        from accord.testing.tiny import build_pipeline

        return FluxBackbone(build_pipeline("flux"), "tiny flux")
    family = "sdxl" if case.kind == "sdxl" else "sd"
    unet_cfg = dict(SDXL_UNET if family == "sdxl" else SD15_UNET)
    unet_cfg.update(case.unet or {})
    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the device
        unet = UNet2DConditionModel(**unet_cfg)
    return LatentBackbone(family, unet, DDPMScheduler(**SD_SCHEDULE), resolution=8 * case.size)


class Bench:
    """Backbone + method + optimizer built the way ``accord.train.train`` builds them, and a fixed batch."""

    def __init__(self, case: Case, accelerator, seed: int = 0):
        from diffusers.optimization import get_scheduler

        from accord.data.captions import split_caption
        from accord.methods import get_method
        from accord.train import Trainer, _make_optimizer, _rebind

        self.case, self.accelerator = case, accelerator
        device = accelerator.device
        self.config = _config(case, str(device))
        self.backbone = backbone = _build_backbone(case, device)
        self.method = method = get_method(case.method)(self.config, backbone)
        method.setup()
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(case.mixed_precision, torch.float32)
        for module in backbone.frozen_modules():
            module.to(device, **({} if weight_dtype == torch.float32 else {"dtype": weight_dtype}))
        for p in method.parameters():
            p.data = p.data.float()
        self.weight_dtype = weight_dtype
        self.params = method.parameters()
        self.trainable = sum(p.numel() for p in self.params)
        optimizer = _make_optimizer(self.config, self.params)
        self.lr_scheduler = get_scheduler("constant", optimizer=optimizer)
        prepared = accelerator.prepare(*method.trainable_modules(), optimizer)
        self.optimizer = prepared[-1]
        _rebind(backbone, method, prepared[:-1])

        # the fixed batch: random pixels (tiny) or random latents (real) and captions "1 sks backpack, girl, park"
        rng = random.Random(seed)
        captions = [f"1 {case.trigger} backpack, {', '.join(rng.sample(GENERAL_WORDS, 2))}" for _ in range(case.batch)]
        split = [split_caption(c, case.trigger) for c in captions]
        g = torch.Generator().manual_seed(seed)
        if case.kind.startswith("tiny"):
            pixels = torch.rand(case.batch, 3, case.size, case.size, generator=g) * 2 - 1
        else:
            pixels = torch.randn(case.batch, 4, case.size, case.size, generator=g).to(device)
        self.batch = {"pixel_values": pixels, "index": torch.arange(case.batch), "caption": captions,
                      "personal": [p for p, _ in split], "general": [q for _, q in split]}
        # the plain reference pre-computes its text embeddings once (diffusers' --pre_compute_text_embeddings)
        with torch.no_grad():
            self.plain_cond = backbone.encode_prompts(captions)
        self.variant_configs = {
            "off": self.config,
            "fast": _with_accord(self.config, dd_weight=DD_WEIGHT, mode="fast"),
            "lean": _with_accord(self.config, dd_weight=DD_WEIGHT, mode="lean"),
            "fast-dd1": _with_accord(self.config, dd_weight=DD_WEIGHT, mode="fast", dd_batch=1),
            "fast-share": _with_accord(self.config, dd_weight=DD_WEIGHT, mode="fast"),
        }
        # one Trainer per variant, all on the same model, optimizer and fixed batch
        fixed = _FixedBatch(self.batch)
        self.trainers = {v: Trainer(c, accelerator, backbone, method, self.optimizer, self.lr_scheduler, fixed)
                         for v, c in self.variant_configs.items()}
        self.step_index = 0

    # -- (a) the stock diffusers step -----------------------------------------------------------------
    def plain_step(self) -> float:
        accel, bb = self.accelerator, self.backbone
        unet, noise_scheduler = bb.denoiser, bb.noise_scheduler
        pixel_values = self.batch["pixel_values"].to(accel.device)
        with accel.autocast():
            if bb.vae is not None:
                model_input = bb.vae.encode(pixel_values.to(dtype=bb.vae.dtype)).latent_dist.sample()
                model_input = model_input * bb.vae.config.scaling_factor
            else:
                model_input = pixel_values
            noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device)
            timesteps = timesteps.long()
            noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
            # learned tokens (textual_inversion, custom_diffusion): the text encoder runs with gradient each step,
            # as in diffusers' textual_inversion.py; otherwise pre-computed embeddings
            cond = bb.encode_prompts(self.batch["caption"]) if self.method.trains_text else self.plain_cond
            image = self.method.reference_condition(self.batch)  # image methods: the reference's condition
            if image is not None:
                cond = self.method.attach(cond, image)
            kwargs = {}
            if cond.pooled is not None:
                kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
            if cond.image_embeds is not None:  # IP-Adapter: the UNet's image projection reads them
                kwargs.setdefault("added_cond_kwargs", {})["image_embeds"] = [cond.image_embeds]
            model_pred = unet(noisy_model_input, timesteps, cond.embeds, return_dict=False, **kwargs)[0]
            if noise_scheduler.config.prediction_type == "epsilon":
                target = noise
            else:
                target = noise_scheduler.get_velocity(model_input, noise, timesteps)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        accel.backward(loss)
        accel.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_optimizer_step()  # textual inversion: restore the rows it does not learn (as the script)
        return loss.detach().item()

    # -- (b)-(e) accord's step: Trainer.step, the body of train()'s loop ------------------------------
    def accord_step(self, variant: str) -> float:
        self.step_index += 1
        logs = self.trainers[variant].step(self.step_index, measure_share=variant == "fast-share")
        if logs is None:
            raise RuntimeError(f"non-finite loss in variant {variant}")
        return logs["loss"]

    def step(self, variant: str) -> float:
        return self.plain_step() if variant == "plain" else self.accord_step(variant)


class _FixedBatch:
    """The same batch for every (step, micro-batch): what ``Trainer`` reads through ``get``."""

    def __init__(self, batch: dict):
        self.batch = batch

    def get(self, step: int, micro: int) -> dict:
        return self.batch


def _with_accord(config, **changes):
    return dataclasses.replace(config, accord=dataclasses.replace(config.accord, **changes))


# ---------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(bench: Bench, variants, warmup: int, steps: int, rounds: int, log=print) -> list[dict]:
    device = bench.accelerator.device
    cuda = device.type == "cuda"
    times = {v: [] for v in variants}
    peaks = {v: 0 for v in variants}
    oom: set[str] = set()

    def guarded(v, fn):
        """Run fn; a CUDA out-of-memory error marks the variant OOM (reported, not fatal) instead of ending the run."""
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            oom.add(v)
            bench.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            log(f"  {v}: CUDA out of memory; reported as OOM")
            return None

    for v in variants:  # warm-up (allocator, autocast caches, optimizer state, text cache)
        guarded(v, lambda v=v: [bench.step(v) for _ in range(warmup)])
    _sync(device)
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # alternate who runs first
        for v in order:
            if v in oom:
                continue
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)

            def block(v=v):
                for _ in range(steps):
                    _sync(device)
                    t0 = time.perf_counter()
                    loss = bench.step(v)
                    _sync(device)
                    times[v].append(time.perf_counter() - t0)
                    if not math.isfinite(loss):
                        raise RuntimeError(f"{v}: non-finite loss {loss}")
                if cuda:
                    peaks[v] = max(peaks[v], torch.cuda.max_memory_allocated(device))

            guarded(v, block)
        log(f"  round {r + 1}/{rounds}: " + "  ".join(
            f"{v} {1000 * statistics.median(times[v]):.1f} ms" if times[v] and v not in oom else f"{v} OOM"
            for v in variants))
    base = "off" if "off" in variants else variants[0]
    nan = float("nan")
    ok = lambda v: bool(times[v]) and v not in oom  # noqa: E731
    base_ms = 1000 * statistics.median(times[base]) if ok(base) else nan
    rows = []
    for v in variants:
        ms = 1000 * statistics.median(times[v]) if ok(v) else nan
        row = {"case": bench.case.name, "variant": v, "label": LABELS[v] + (" [OOM]" if v in oom else ""), "ms": ms,
               "ms_min": 1000 * min(times[v]) if ok(v) else nan, "ms_max": 1000 * max(times[v]) if ok(v) else nan,
               "samples": len(times[v]) if ok(v) else 0,
               "time_ratio": ms / base_ms,
               "peak_bytes": (peaks[v] if ok(v) else nan) if cuda else None,
               "mem_ratio": (peaks[v] / peaks[base] if ok(v) and ok(base) and peaks[base] else nan) if cuda else None,
               "trainable_params": bench.trainable}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- reporting


def device_card(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    cuda = any(r["peak_bytes"] is not None for r in rows)
    head = ["case", "variant", "ms/step (median)", "min-max ms", "× (b)"] + (["peak GiB", "mem × (b)"] if cuda else [])
    body = []
    for r in rows:
        line = [r["case"], r["label"], f"{r['ms']:.1f}", f"{r['ms_min']:.0f}-{r['ms_max']:.0f}",
                f"{r['time_ratio']:.2f}"]
        if cuda:
            line += [f"{r['peak_bytes'] / 2**30:.2f}", f"{r['mem_ratio']:.2f}"]
        body.append(line)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in body]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in body])


def summary_lines(rows: list[dict]) -> list[str]:
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["variant"]: r for r in rows if r["case"] == case}
        parts = [f"{case} ({by[next(iter(by))]['trainable_params'] / 1e6:.2f} M trainable):"]
        if "plain" in by and "off" in by:
            parts.append(f"accord off vs plain diffusers {by['off']['ms'] / by['plain']['ms']:.2f}× time")
        for v in ("fast", "lean", "fast-dd1", "fast-share"):
            if v in by:
                mem = f", {by[v]['mem_ratio']:.2f}× memory" if by[v]["mem_ratio"] is not None else ""
                parts.append(f"{v} {by[v]['time_ratio']:.2f}× time{mem}")
        out.append(" ".join(parts[:1]) + " " + "; ".join(parts[1:]))
    return out


def append_results(path: Path, rows: list[dict], device: torch.device, settings: str, load: tuple | None) -> None:
    import diffusers

    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"\n## {stamp} — {device_card(device)}\n\n",
             f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}; "
             f"{settings}"]
    if load is not None:
        lines.append(f"; load average before/after: {load[0]:.2f} / {load[1]:.2f} (on {os.cpu_count()} cores)")
    lines += ["\n\n", format_table(rows, markdown=True), "\n\n"]
    lines += [f"- {s}\n" for s in summary_lines(rows)]
    with open(path, "a") as f:
        f.write("".join(lines))


# ---------------------------------------------------------------------------- entry point


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="real-size SD1.5 full fine-tune + SDXL LoRA-64 (needs CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                   help=f"tiny mode: cases ({', '.join(TINY_CASES)}, or all; default: {' '.join(DEFAULT_CASES)})")
    p.add_argument("--methods", nargs="+", default=None,
                   help="--real: methods (dreambooth, lora); tiny mode: the same as --cases")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=32, help="tiny mode: pixels")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 2 tiny, 3 real)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant per round (default 3 tiny, 4 real)")
    p.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 4 tiny, 3 real)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on the CPU: on a shared machine more threads than free cores "
                        "make OpenMP spin and steps 10-50x slower at random, which ruins ratios)")
    p.add_argument("--append-results", nargs="?", const=str(RESULTS), default=None, metavar="PATH",
                   help="append a dated section to PATH (default "
                        f"{RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS})")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None, cases: list[Case] | None = None) -> dict:
    """Run the benchmark; returns ``{"rows": [...], "table": str, "device": str}``."""
    from accelerate import Accelerator

    args = parse_args(argv)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, **k, flush=True))
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads or device_name == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.real and device_name != "cuda" and cases is None:
        raise SystemExit("--real needs a CUDA device (real-size SDXL does not fit a CPU step budget)")
    warmup = args.warmup if args.warmup is not None else (3 if args.real else 2)
    steps = args.steps if args.steps is not None else (4 if args.real else 3)
    rounds = args.rounds if args.rounds is not None else (3 if args.real else 5)
    if cases is None:
        names = args.cases or args.methods or list(DEFAULT_CASES)
        names = list(TINY_CASES) if names == ["all"] else names
        cases = real_cases(args.methods) if args.real else tiny_cases(names, args.batch, args.size)
    variants = [v for v in VARIANTS if v in args.variants]
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: list[dict] = []
    device = None
    for case in cases:
        accelerator = Accelerator(cpu=device_name == "cpu", mixed_precision=case.mixed_precision)
        device = accelerator.device
        log(f"{case.name}: batch {case.batch}, {'pixels' if case.kind.startswith('tiny') else 'latents'} {case.size}, "
            f"{case.mixed_precision}, on {device_card(device)}; warm-up {warmup}, {rounds} rounds x {steps} steps")
        t0 = time.perf_counter()
        bench = Bench(case, accelerator)
        log(f"  built in {time.perf_counter() - t0:.1f}s, {bench.trainable / 1e6:.2f} M trainable parameters")
        case_variants = [v for v in variants if v != "plain" or case.has_plain]
        if case_variants != variants:
            log("  (a) skipped: no stock UNet step for this backbone; ratios are against (b)")
        rows += measure(bench, case_variants, warmup, steps, rounds, log=log)
        del bench
        accelerator.free_memory()  # the accelerator holds the prepared model and optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    table = format_table(rows)
    log("\n" + table + "\n")
    for line in summary_lines(rows):
        log(line)
    if args.append_results:
        settings = (f"{'real-size, random weights' if args.real else 'tiny random SD'}; batch {cases[0].batch}; "
                    f"DDLoss weight {DD_WEIGHT}; warm-up {warmup}, {rounds} rounds x {steps} steps per variant, "
                    "median; "
                    f"command: `python benchmarks/overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
        append_results(Path(args.append_results), rows, device, settings,
                       (load0, load1) if load0 is not None and device.type == "cpu" else None)
        log(f"appended to {args.append_results}")
    return {"rows": rows, "table": table, "device": device_card(device)}


if __name__ == "__main__":
    main()
