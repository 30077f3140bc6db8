"""``accord lab pretrain``: the lab's miniature models, trained from scratch on the world, seeded.

Stages: ``STAGES``, run in that order; each writes into ``<out>/stages/`` and can run in its own process. What each
one trains, and why the UNet has three, is documented in one place: docs/lab.md, "Pretraining stages".

The checkered pattern (the personal subject's look) is kept out of the CLIP and UNet corpora.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import models as M
from .world import (
    BACKGROUNDS,
    COLORS,
    PATTERNS,
    PLACES,
    PRETRAIN_PATTERNS,
    SHAPES,
    parse_caption,
    random_caption,
    random_scene,
    render,
)

__all__ = ["Recipe", "STAGES", "run_stage", "to_tensor", "labels_of", "timesteps"]

STAGES = ("vae", "clip", "detector", "unet", "unet-focus", "unet-grow", "assemble")
CLIP_BINDING_WEIGHT = 0.5  # token-level colour/pattern head of the clip stage, beside InfoNCE


@dataclass
class Recipe:
    seed: int = 0
    vae_steps: int = 1600
    vae_refine_steps: int = 0  # decoder-only phase; 50 steps did not lower the error on 2026-11-26
    clip_steps: int = 1000
    detector_steps: int = 800
    detector_refine_steps: int = 400
    unet_steps: int = 5000
    focus_steps: int = 1500  # unet-focus stage: continues unet, timesteps drawn towards the noisiest
    focus_share: float = 0.6  # share of each batch drawn from the noisiest focus_window timesteps
    focus_window: int = 400
    focus_weight_cap: float = 10.0  # loss weight (1 - a)/a = 1/SNR, clamped to [1, cap]: x0-space error at high noise
    grow_steps: int = 2000  # unet-grow stage: unet-focus with 16x16 cross-attention, trained as unet-focus is,
    grow_rounds: int = 2  # in rounds of grow_steps, each on a fresh pool
    batch: int = 48
    pool: int = 20000  # scenes cached for the UNet stage

    @classmethod
    def smoke(cls) -> Recipe:
        return cls(vae_steps=3, vae_refine_steps=3, clip_steps=3, detector_steps=3, detector_refine_steps=3,
                   unet_steps=3, focus_steps=3, grow_steps=3, grow_rounds=2, batch=8, pool=64)


def to_tensor(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 HWC image(s) → float NCHW in [-1, 1]."""
    arr = np.stack(images) if isinstance(images, list) else images
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def labels_of(scene) -> dict[str, int]:
    """Detector targets (-1 = ignore) for one scene."""
    out = {"background": list(BACKGROUNDS).index(scene.background)}
    for s in SHAPES:
        o = scene.find(s)
        out[f"{s}.present"] = int(o is not None)
        out[f"{s}.color"] = list(COLORS).index(o.color) if o else -1
        out[f"{s}.pattern"] = PATTERNS.index(o.pattern) if o else -1
        out[f"{s}.place"] = PLACES.index(o.place) if o else -1
    return out


def _batch(rng: random.Random, n: int, patterns) -> tuple[list, torch.Tensor]:
    scenes = [random_scene(rng, patterns=patterns) for _ in range(n)]
    return scenes, to_tensor([render(s) for s in scenes])


def _log(out: Path, stage: str, step: int, total: int, t0: float, **values) -> None:
    text = " ".join(f"{k}={v:.4f}" for k, v in values.items())
    line = f"[{stage}] step {step}/{total} {time.time() - t0:.0f}s {text}"
    print(line, flush=True)


def _update(opt, sched, loss: torch.Tensor, clip=None) -> None:
    """One optimizer step of a stage: backward, optional gradient clipping at norm 1, step, schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur a random half and add noise: generated images are softer than renders."""
    n = x.shape[0]
    k = torch.tensor([[1.0, 2.0, 1.0]]) / 4
    kernel = (k.T @ k).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    mix = torch.rand(n, 1, 1, 1, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
    x = x * (1 - mix) + blurred * mix
    return x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.08


def train_vae(out: Path, r: Recipe) -> None:
    torch.manual_seed(r.seed)
    rng = random.Random(r.seed)
    vae = M.lab_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=r.vae_steps, pct_start=0.05)
    t0 = time.time()
    for step in range(1, r.vae_steps + 1):
        _, x = _batch(rng, r.batch // 2, PATTERNS)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        _update(opt, sched, loss)
        if step % 25 == 0 or step == r.vae_steps:
            _log(out, "vae", step, r.vae_steps, t0, loss=loss.item(), mse=F.mse_loss(rec, x).item())
    with torch.no_grad():
        _, x = _batch(rng, min(256, r.pool), PATTERNS)
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(out / "stages" / "vae")  # the UNet stage may start from here
    if r.vae_refine_steps:
        vae_refine(vae, r, out)
        vae.save_pretrained(out / "stages" / "vae-decoder")


def vae_refine(vae, r: Recipe, out: Path, save_every: int = 0) -> None:
    """Second phase: the encoder (so the latent space the UNet learns) is frozen; the decoder alone learns
    to decode the posterior mean at a lower rate. The first phase alone left blurry, colour-averaged
    reconstructions, and this way the phase can run beside the UNet stage."""
    rng = random.Random(r.seed + 10)
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=max(1, r.vae_refine_steps), pct_start=0.05)
    t0 = time.time()
    for step in range(1, r.vae_refine_steps + 1):
        _, x = _batch(rng, r.batch // 2, PATTERNS)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        _update(opt, sched, loss)
        if step % 25 == 0 or step == r.vae_refine_steps:
            _log(out, "vae-decoder", step, r.vae_refine_steps, t0, loss=loss.item(), mse=F.mse_loss(rec, x).item())
        if save_every and step % save_every == 0:
            vae.save_pretrained(out / "stages" / "vae-decoder")
    vae.requires_grad_(True)


def clip_loss(img_feat, txt_feat, logit_scale, neg_feat=None) -> torch.Tensor:
    """Symmetric InfoNCE; ``neg_feat`` adds hard-negative captions to the image→text side only (NegCLIP,
    Yuksekgonul et al., ICLR 2023)."""
    img, txt = F.normalize(img_feat, dim=-1), F.normalize(txt_feat, dim=-1)
    logits = logit_scale.exp() * img @ txt.T
    labels = torch.arange(len(img))
    i2t = (logits if neg_feat is None
           else torch.cat([logits, logit_scale.exp() * img @ F.normalize(neg_feat, dim=-1).T], 1))
    return (F.cross_entropy(i2t, labels) + F.cross_entropy(logits.T, labels)) / 2


def hard_negative(rng: random.Random, caption_text: str) -> str:
    """The caption with one thing changed: in a two-object caption, 40% of the time the two objects'
    colours exchanged (same words, other binding); otherwise one object's shape or colour swapped for one
    the caption does not use, or its side swapped. Plain contrastive training on this world learns colours
    and backgrounds first and leaves the shape words nearly interchangeable in the text tower (cosine 0.99
    between "red square" and "red circle" after 200 steps), and without the exchange the tower does not
    bind a colour to its shape (0.97 between the "circle" token of "red square, yellow circle" and of
    "yellow square, red circle"); no UNet trained on that tower can undo either."""
    phrases = caption_text.split(", ")
    objects = [i for i, p in enumerate(phrases) if not p.endswith(" background")]
    colours = {i: next(w for w in phrases[i].split(" ") if w in COLORS) for i in objects}
    u = rng.random()
    if len(objects) == 2 and len(set(colours.values())) == 2 and u < 0.4:
        a, b = objects
        for i, new_colour in ((a, colours[b]), (b, colours[a])):
            phrases[i] = " ".join(new_colour if w == colours[i] else w for w in phrases[i].split(" "))
        return ", ".join(phrases)
    u = rng.random()
    i = rng.choice(objects)
    words = phrases[i].split(" ")
    used = set(caption_text.replace(",", "").split(" "))
    if u < 0.2 and words[-1] in ("left", "right"):  # the other side
        words[-1] = "right" if words[-1] == "left" else "left"
    else:
        kind = SHAPES if u < 0.75 else tuple(COLORS)
        j = next(k for k, w in enumerate(words) if w in kind)
        words[j] = rng.choice([w for w in kind if w not in used])
    phrases[i] = " ".join(words)
    return ", ".join(phrases)


def token_targets(tok, captions: list[str], ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Where each caption's shape words sit in its token ``ids`` (:func:`tokenize`'s rows for ``captions``), with
    that object's colour and pattern: ``(caption index, token position, colour index, pattern index)`` for the
    token-level head of :func:`train_clip`."""
    shape_ids = {tok.convert_tokens_to_ids(f"{s}</w>"): s for s in SHAPES}
    rows, cols, colours, patterns = [], [], [], []
    for n, text in enumerate(captions):
        asked = parse_caption(text)["objects"]
        for k, t in enumerate(ids[n].tolist()):
            if t in shape_ids:
                want = asked[shape_ids[t]]
                rows.append(n)
                cols.append(k)
                colours.append(list(COLORS).index(want["color"]))
                patterns.append(PATTERNS.index(want.get("pattern", "solid")))
    return torch.tensor(rows), torch.tensor(cols), torch.tensor(colours), torch.tensor(patterns)


def tokenize(tok, captions: list[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=M.TEXT_LEN, truncation=True, return_tensors="pt").input_ids


def train_clip(out: Path, r: Recipe) -> None:
    torch.manual_seed(r.seed + 1)
    rng = random.Random(r.seed + 1)
    tok, text, image = M.tokenizer(), M.mini_clip_text(), M.ImageTower()
    logit_scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
    # Token-level head (discarded after training): the hidden state of each shape word must tell that
    # object's colour and pattern, which precede it. The UNet cross-attends to these states, and the pooled
    # contrastive loss alone leaves each shape token nearly blind to its own colour.
    heads = torch.nn.ModuleDict({"color": torch.nn.Linear(M.EMBED, len(COLORS)),
                                 "pattern": torch.nn.Linear(M.EMBED, len(PATTERNS))})
    params = list(text.parameters()) + list(image.parameters()) + list(heads.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=r.clip_steps, pct_start=0.1)
    g = torch.Generator().manual_seed(r.seed)
    t0 = time.time()
    for step in range(1, r.clip_steps + 1):
        scenes, x = _batch(rng, 2 * r.batch, PRETRAIN_PATTERNS)
        captions = [random_caption(rng, s) for s in scenes]
        ids = tokenize(tok, captions + [hard_negative(rng, c) for c in captions])
        out_text = text(ids)
        embeds = out_text.text_embeds
        contrastive = clip_loss(image(_augment(x, g)), embeds[:len(scenes)], logit_scale, embeds[len(scenes):])
        rows, cols, colours, patterns = token_targets(tok, captions, ids[:len(captions)])
        states = out_text.last_hidden_state[rows, cols]
        binding = F.cross_entropy(heads["color"](states), colours) + F.cross_entropy(heads["pattern"](states), patterns)
        loss = contrastive + CLIP_BINDING_WEIGHT * binding
        _update(opt, sched, loss)
        with torch.no_grad():
            logit_scale.clamp_(0, np.log(100.0))
        if step % 25 == 0 or step == r.clip_steps:
            _log(out, "clip", step, r.clip_steps, t0, loss=contrastive.item(), binding=binding.item(),
                 scale=logit_scale.exp().item())
    d = out / "stages" / "clip"
    text.save_pretrained(d / "text")
    from safetensors.torch import save_file

    save_file({**image.state_dict(), "logit_scale": logit_scale.detach().reshape(1)}, d / "image_tower.safetensors")


def train_detector(out: Path, r: Recipe) -> None:
    torch.manual_seed(r.seed + 2)
    rng = random.Random(r.seed + 2)
    det = M.Detector()
    opt = torch.optim.AdamW(det.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=r.detector_steps, pct_start=0.1)
    _fit_detector(det, r, out, rng, torch.Generator().manual_seed(r.seed), opt, sched, r.detector_steps, "detector")
    detector_refine(det, r, out)
    from safetensors.torch import save_file

    (out / "stages").mkdir(parents=True, exist_ok=True)
    save_file(det.state_dict(), out / "stages" / "detector.safetensors")


def detector_refine(det, r: Recipe, out: Path) -> None:
    """Second phase at a lower rate on fresh draws (the first left the pattern head at ~96%)."""
    rng = random.Random(r.seed + 12)
    opt = torch.optim.AdamW(det.parameters(), lr=5e-4, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, r.detector_refine_steps))
    _fit_detector(det, r, out, rng, torch.Generator().manual_seed(r.seed + 12), opt, sched, r.detector_refine_steps,
                  "detector-refine")


def _fit_detector(det, r: Recipe, out: Path, rng, g, opt, sched, steps: int, stage: str) -> None:
    """Cross-entropy on every attribute head, fresh augmented renders each step."""
    t0 = time.time()
    for step in range(1, steps + 1):
        scenes, x = _batch(rng, r.batch, PATTERNS)
        targets = [labels_of(s) for s in scenes]
        logits = det(_augment(x, g))
        loss = sum(F.cross_entropy(v, torch.tensor([t[k] for t in targets]), ignore_index=-1)
                   for k, v in logits.items())
        _update(opt, sched, loss)
        if step % 25 == 0 or step == steps:
            _log(out, stage, step, steps, t0, loss=loss.item())


def _unet_corpus(out: Path, r: Recipe, rng: random.Random, stage: str = "unet") -> tuple:
    """The UNet stages' cached corpus: VAE posteriors of ``r.pool`` fresh scenes, the text states of one
    caption per scene, the empty caption's states (classifier-free guidance) and the latent scaling factor."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(out / "stages" / "vae").eval()
    text = CLIPTextModel.from_pretrained(out / "stages" / "clip" / "text").eval()
    tok = M.tokenizer()
    t0 = time.time()
    means, stds, embeds = [], [], []
    with torch.no_grad():
        for i in range(0, r.pool, 256):
            scenes, x = _batch(rng, min(256, r.pool - i), PRETRAIN_PATTERNS)
            post = vae.encode(x).latent_dist
            means.append(post.mean)
            stds.append(post.std)
            embeds.append(text(tokenize(tok, [random_caption(rng, s) for s in scenes]))[0].half())
        empty = text(tokenize(tok, [""]))[0]
    means, stds, embeds = torch.cat(means), torch.cat(stds), torch.cat(embeds)
    print(f"[{stage}] cached {len(means)} scenes in {time.time() - t0:.0f}s", flush=True)
    return means, stds, embeds, empty, vae.config.scaling_factor


def timesteps(n: int, total: int, g: torch.Generator, focus: float = 0.0, window: int = 0) -> torch.Tensor:
    """``n`` training timesteps, uniform over ``[0, total)``; with ``focus`` > 0 that share of them (in
    expectation) is redrawn from the noisiest ``window``. ``focus=0`` draws exactly what a plain uniform draw does."""
    t = torch.randint(0, total, (n,), generator=g)
    if focus:
        noisy = torch.rand(n, generator=g) < focus
        t[noisy] = torch.randint(total - window, total, (int(noisy.sum()),), generator=g)
    return t


def _fit_unet(unet, corpus: tuple, r: Recipe, out: Path, stage: str, steps: int, lr: float, g: torch.Generator,
              focus: float = 0.0, window: int = 0, weight_cap: float = 0.0) -> None:
    """Epsilon-prediction training of ``unet`` on ``corpus``, 10% empty captions, one-cycle ``lr``; saved to
    ``<out>/stages/<stage>`` every 250 steps. ``focus``: the share of each batch whose timestep is drawn from
    the noisiest ``window`` steps instead of all of them; ``weight_cap`` > 0 weights each sample's
    error by 1/SNR(t) clamped to ``[1, weight_cap]`` (its error in x0 rather than in epsilon, up to the cap)."""
    from diffusers import DDPMScheduler

    means, stds, embeds, empty, scale = corpus
    noise_sched = DDPMScheduler.from_config(M.lab_scheduler().config)
    total = noise_sched.config.num_train_timesteps
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(means), (r.batch,), generator=g)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scale
        cond = embeds[idx].float()
        drop = torch.rand(r.batch, generator=g) < 0.1
        cond[drop] = empty
        noise = torch.randn(latents.shape, generator=g)
        t = timesteps(r.batch, total, g, focus, window)
        pred = unet(noise_sched.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
        if weight_cap:
            a = noise_sched.alphas_cumprod[t]
            w = ((1 - a) / a).clamp(1.0, weight_cap)
            loss = (pred - noise).pow(2).mean(dim=(1, 2, 3)).mul(w).sum() / w.sum()
        else:
            loss = F.mse_loss(pred, noise)
        _update(opt, sched, loss, clip=unet.parameters())
        if step % 25 == 0 or step == steps:
            _log(out, stage, step, steps, t0, loss=loss.item())
        if step % 250 == 0 or step == steps:
            unet.save_pretrained(out / "stages" / stage)


def train_unet(out: Path, r: Recipe) -> None:
    torch.manual_seed(r.seed + 3)
    corpus = _unet_corpus(out, r, random.Random(r.seed + 3))
    _fit_unet(M.lab_unet(), corpus, r, out, "unet", r.unet_steps, 1e-3, torch.Generator().manual_seed(r.seed))


def focus_unet(out: Path, r: Recipe) -> None:
    """Continue the ``unet`` stage on a fresh pool with most timesteps drawn from the noisiest ones and their
    error weighted towards x0's: there a two-object scene's colours get bound to its shapes (from a true render
    noised to t = 700 the ``unet`` stage still exchanged the colours of 9% of two-object scenes; from t = 600, 3%)."""
    from diffusers import UNet2DConditionModel

    seed = r.seed + 41
    torch.manual_seed(seed)
    corpus = _unet_corpus(out, r, random.Random(seed), "unet-focus")
    unet = UNet2DConditionModel.from_pretrained(out / "stages" / "unet")
    _fit_unet(unet, corpus, r, out, "unet-focus", r.focus_steps, 3e-4, torch.Generator().manual_seed(seed),
              focus=r.focus_share, window=r.focus_window, weight_cap=r.focus_weight_cap)


def grow_unet(out: Path, r: Recipe) -> None:
    """``unet-focus`` with cross-attention grown at its 16x16 level (:func:`accord.lab.models.grow_cross_attention`),
    trained in ``r.grow_rounds`` rounds with ``unet-focus``'s timestep draw, weights and learning rate, each round
    a one-cycle run on a fresh pool that continues the previous one."""
    unet = None
    for k in range(r.grow_rounds):
        unet = grow_round(out, r, k, unet)


def grow_round(out: Path, r: Recipe, k: int, unet=None):
    """Round ``k`` of the ``unet-grow`` stage, from ``unet`` (round 0: grown from the ``unet-focus`` stage)."""
    from diffusers import UNet2DConditionModel

    seed = r.seed + 77 + k
    torch.manual_seed(seed)
    if unet is None:
        unet = M.grow_cross_attention(UNet2DConditionModel.from_pretrained(out / "stages" / "unet-focus"))
    corpus = _unet_corpus(out, r, random.Random(seed), "unet-grow")
    _fit_unet(unet, corpus, r, out, "unet-grow", r.grow_steps, 3e-4, torch.Generator().manual_seed(seed),
              focus=r.focus_share, window=r.focus_window, weight_cap=r.focus_weight_cap)
    return unet


def _last(stages: Path, *names: str) -> Path:
    """A model's output folder: that of the last of its stages ``names`` (in recipe order) that ran."""
    return next((stages / n for n in reversed(names) if (stages / n).is_dir()), stages / names[0])


def assemble(out: Path, r: Recipe) -> Path:
    """Write ``<out>/sd`` (a StableDiffusionPipeline folder) and ``<out>/mini_clip_image.safetensors``,
    ``<out>/detector.safetensors``."""
    import shutil

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    st = out / "stages"
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(_last(st, "vae", "vae-decoder")),
        unet=UNet2DConditionModel.from_pretrained(_last(st, "unet", "unet-focus", "unet-grow")),
        text_encoder=CLIPTextModel.from_pretrained(st / "clip" / "text"), tokenizer=M.tokenizer(),
        scheduler=M.lab_scheduler(), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "sd")
    # The text encoder folder keeps CLIP's projection too, so CLIPTextModelWithProjection loads from it
    # (PDLoss's accord.pd_clip and the CLIP-T analog); CLIPTextModel ignores the extra weight.
    for name in ("model.safetensors", "config.json"):
        shutil.copy(st / "clip" / "text" / name, out / "sd" / "text_encoder" / name)
    shutil.copy(st / "clip" / "image_tower.safetensors", out / "mini_clip_image.safetensors")
    shutil.copy(st / "detector.safetensors", out / "detector.safetensors")
    # Stored in float16 to keep the repository small; diffusers and transformers load them as float32.
    for f in [*(out / "sd").glob("*/*.safetensors"), out / "mini_clip_image.safetensors", out / "detector.safetensors"]:
        _to_fp16(f)
    return out / "sd"


def _to_fp16(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, path, metadata=meta)


def run_stage(stage: str, out: Path, recipe: Recipe) -> float:
    """Run one stage; returns its wall time in seconds (also appended to ``<out>/recipe.json``)."""
    fn = {"vae": train_vae, "clip": train_clip, "detector": train_detector, "unet": train_unet,
          "unet-focus": focus_unet, "unet-grow": grow_unet, "assemble": assemble}[stage]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fn(out, recipe)
    seconds = time.time() - t0
    log = out / f"recipe-{stage}.json"
    log.write_text(json.dumps({"stage": stage, "seconds": round(seconds, 1), "recipe": recipe.__dict__,
                               "threads": torch.get_num_threads(), "torch": torch.__version__}, indent=1))
    return seconds
