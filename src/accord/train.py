"""The training loop: one read from top to bottom. Backbones, methods and losses plug in.

Every random draw of step ``s`` comes from generators seeded by ``(seed, s, rank)`` and the data
order from ``(seed, epoch)``, so a run resumed from a checkpoint repeats the uninterrupted run
exactly (bitwise on the CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .backbones import Conditioning, load_backbone
from .checkpoint import CONFIG_FILE, list_checkpoints, resume_checkpoint, save_checkpoint, write_config
from .config import Config, config_to_dict
from .errors import AccordError, ConfigError
from .losses import classdiffusion_loss, dd_loss, pd_loss, sude_loss
from .methods import get_method
from .monitor import TermsMonitor
from .output import writable_folder

logger = logging.getLogger("accord.train")

__all__ = ["train", "build_model", "compute_step", "StepLosses"]


# ---------------------------------------------------------------------------- data


class _Batches:
    """Micro-batches by (step, micro, rank): epoch permutations seeded by (seed, epoch).

    With aspect-ratio buckets, each micro-batch is one of ``BucketBatchSampler``'s same-size batches. A streamed
    dataset (``stream_samples(start, count)``, e.g. :class:`accord.data.streamed.StreamedCaptions`) is this rank's
    shard read in order: micro-batch (step, micro) is its samples from ``(step * accumulation + micro) * batch_size``."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int, world: int, accumulation: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.accumulation = rank, world, accumulation
        self._epochs: dict[int, list[list[int]]] = {}
        self._bucketed = bool(getattr(dataset, "buckets", None))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            if self._bucketed:
                from .data.references import BucketBatchSampler

                sampler = BucketBatchSampler(self.dataset, self.batch_size, seed=self.seed)
                sampler.set_epoch(epoch)
                self._epochs = {epoch: list(sampler)}
            else:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epochs = {epoch: [[int(i)] for i in torch.randperm(len(self.dataset), generator=g)]}
        return self._epochs[epoch]

    def _indices(self, position: int, count: int) -> list[tuple[int, int]]:
        """(epoch, dataset index) for ``count`` consecutive units starting at ``position``."""
        out, epoch = [], 0
        while count:
            units = self._epoch_batches(epoch)
            if position >= len(units):
                position -= len(units)
                epoch += 1
                continue
            out.append((epoch, units[position]))
            position, count = position + 1, count - 1
        return out

    def get(self, step: int, micro: int) -> dict:
        from .data.references import collate_references

        if hasattr(self.dataset, "stream_samples"):  # a stream, already this rank's shard: its samples in order
            start = (step * self.accumulation + micro) * self.batch_size
            return collate_references(self.dataset.stream_samples(start, self.batch_size))
        slot = (step * self.accumulation + micro) * self.world + self.rank
        if self._bucketed:  # one same-size batch per slot
            picks = self._indices(slot, 1)
        else:  # batch_size single images per slot
            picks = self._indices(slot * self.batch_size, self.batch_size)
        samples = []
        for epoch, unit in picks:
            self.dataset.set_epoch(epoch)
            samples.extend(self.dataset[i] for i in unit)
        return collate_references(samples)


def _build_data(config: Config, accelerator, backbone, method=None):
    from .data.references import ReferenceDataset

    d = config.data
    own = method.build_dataset(config) if method is not None else None
    if own is not None:  # e.g. an image–caption set for zero-shot IP-Adapter training
        return [], own, None
    from .data.folders import caption_options, scan_instance_dirs  # issue 20: several folders, caption options

    items = scan_instance_dirs(d)  # issue 20: data.instance_dir and data.instance_dirs (repeats, weight, trigger)
    buckets = None
    if d.buckets:
        from .data.images import make_buckets

        # kohya's 64-pixel step at 512 px and above; finer below so small resolutions still get several buckets.
        buckets = make_buckets(d.resolution, step=min(64, max(8, d.resolution // 64 * 8)))
    dataset = ReferenceDataset(items, d.resolution, center_crop=d.center_crop, random_flip=d.random_flip,
                               buckets=buckets, seed=config.train.seed, **caption_options(d))  # issue 20
    no_general = [it.path.name for it in items if not it.general]
    if no_general and config.accord.dd_weight > 0:
        logger.warning("DDLoss has nothing to decouple in %d caption(s) with no other concept (their DD term is 0): %s",
                       len(no_general), ", ".join(no_general))
    class_set = None
    if d.with_prior_preservation:
        from .data.class_images import ClassImages, generate_class_images

        prompt = d.class_prompt or f"a {d.class_noun}"
        folder = Path(d.class_dir or Path(config.train.output_dir) / "class_images")
        generate_class_images(lambda: backbone.pipeline(), prompt, folder, d.num_class_images, seed=config.train.seed,
                              height=d.resolution, width=d.resolution, accelerator=accelerator)
        class_set = ClassImages(folder, prompt, d.resolution, num_images=d.num_class_images, seed=config.train.seed)
    return items, dataset, class_set


# ---------------------------------------------------------------------------- one step


@dataclass
class StepLosses:
    total: torch.Tensor
    parts: dict  # name -> float tensor (detached), for logging


class _TextCache:
    """Encodings of frozen text encoders, computed once per prompt (text-embedding caching)."""

    def __init__(self, backbone, enabled: bool):
        self.backbone, self.enabled, self.store = backbone, enabled, {}

    def __call__(self, prompts: list[str], grad: bool) -> Conditioning:
        if grad or not self.enabled:
            with torch.set_grad_enabled(grad):
                return self.backbone.encode_prompts(prompts)
        missing = sorted({p for p in prompts if p not in self.store})
        if missing:
            with torch.no_grad():
                encoded = self.backbone.encode_prompts(missing)
            for i, p in enumerate(missing):
                self.store[p] = encoded[i : i + 1].detach()
        return Conditioning.cat([self.store[p] for p in prompts])


class _LatentCache:
    """VAE posteriors (mean, std) of fixed-crop images, encoded once; a fresh sample is drawn each step."""

    def __init__(self, backbone, enabled: bool):
        self.backbone, self.enabled, self.store = backbone, enabled, {}

    def __call__(self, pixels: torch.Tensor, keys: list, generator) -> torch.Tensor:
        with torch.no_grad():
            if not self.enabled:
                return self.backbone.encode_images(pixels.to(self.backbone.device), generator=generator)
            missing = [i for i, k in enumerate(keys) if k not in self.store]
            if missing:
                mean, std = self.backbone.latent_distribution(pixels[missing].to(self.backbone.device))
                for j, i in enumerate(missing):
                    self.store[keys[i]] = (mean[j : j + 1], std[j : j + 1])
            mean = torch.cat([self.store[k][0] for k in keys])
            std = torch.cat([self.store[k][1] for k in keys])
            return self.backbone.latents_from(mean, std, generator=generator)


def _diffusion_loss(config: Config, backbone, pred, target, timesteps, mask=None) -> torch.Tensor:
    """Per-sample MSE, min-SNR weighted if asked (Hang et al. 2023, via the parameterization adapter). ``mask`` ``[B, 1, h, w]`` at
    latent size zeroes the error outside it; the mean stays over all elements (as Break-A-Scene's code)."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        err = err * mask.to(err.device, err.dtype)
    per = err.flatten(1).mean(1)
    gamma = config.train.snr_gamma
    if gamma:
        per = per * backbone.parameterization.min_snr_weight(timesteps, gamma).to(per.device, per.dtype)
    return per


def compute_step(config: Config, backbone, method, text, batch: dict, class_batch: dict | None, generator,
                 accelerator, superclass: str, latent_cache=None, *, measure_share: bool = False,
                 timesteps: torch.Tensor | None = None, force_terms: bool = False) -> StepLosses:
    """Losses of one micro-batch; in ``lean`` mode this also runs the backward passes it needs.

    ``measure_share``: also log each regularizer's gradient norm relative to the diffusion loss's on the trained
    parameters (``share_dd``, ``share_pd``, ``share_sude``, ``share_classdiffusion``), through extra backward passes
    that leave ``.grad`` untouched. ``timesteps`` fixes the step's timesteps instead of drawing them, and
    ``force_terms`` computes Eq. 7's terms even with DDLoss off (``accord probe``).
    """
    acc = config.accord
    device = backbone.device
    param = backbone.parameterization
    latent_cache = latent_cache or _LatentCache(backbone, enabled=False)
    batch = method.prepare_batch(batch, generator)
    n_inst = len(batch["caption"])
    captions, personal, general = list(batch["caption"]), list(batch["personal"]), list(batch["general"])
    pixels = batch["pixel_values"]
    if class_batch is not None:
        pixels = torch.cat([pixels, class_batch["pixel_values"]])
        captions += list(class_batch["caption"])
    keys = [("instance", int(i)) for i in batch["index"]]
    if class_batch is not None:
        keys += [("class", int(i)) for i in class_batch["index"]]
    latents = latent_cache(pixels, keys, generator).float()
    noise = torch.randn(latents.shape, generator=generator).to(device)
    if config.train.noise_offset:
        noise = noise + config.train.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=generator).to(device)
    if timesteps is None:
        timesteps = backbone.sample_timesteps(latents.shape[0], generator, config.train)
    timesteps = timesteps.to(device)
    noisy = param.add_noise(latents, noise, timesteps)
    target = param.training_target(latents, noise, timesteps)

    # DD terms (row, c_p, c_g): instance samples whose caption has other concepts, at most accord.dd_batch of them.
    dd_terms = method.dd_conditions(batch) if acc.dd_weight > 0 or force_terms else []
    if acc.dd_batch is not None:
        dd_terms = dd_terms[: acc.dd_batch]
    dd_rows = [r for r, _, _ in dd_terms]
    dd_personal, dd_general = [p for _, p, _ in dd_terms], [g for _, _, g in dd_terms]
    rows = torch.tensor(dd_rows, dtype=torch.long, device=device)
    k = len(dd_rows)
    grad_text = method.trains_text
    micro = _micro_conditions(batch, class_batch)
    # Image-encoder methods: c_p is the reference image; joint and personal include it, general and empty omit it.
    image = method.reference_condition(batch)
    cond = method.attach(_with_micro(text(captions, grad_text), micro), image)
    parts: dict = {}
    if "caption_dropped" in batch:  # issue 20: data.caption_dropout's empty captions carry no DD term; log how many
        parts["captions_dropped"] = batch["caption_dropped"].float().sum()

    mask = method.loss_mask(batch)
    if mask is not None:  # pixel mask → latent size, all ones for class images
        mask = F.interpolate(mask.float(), size=latents.shape[-2:], mode="nearest")
        mask = torch.cat([mask, torch.ones(len(latents) - n_inst, *mask.shape[1:])]).to(device)

    def diffusion(pred_joint):
        """The diffusion loss with prior preservation and the method's own extra losses (no regularizer)."""
        per = _diffusion_loss(config, backbone, pred_joint, target, timesteps, mask)
        loss = per[:n_inst].mean()
        parts["diffusion"] = loss.detach()
        if class_batch is not None:
            prior = per[n_inst:].mean()
            parts["prior"] = prior.detach()
            loss = loss + config.data.prior_loss_weight * prior
        for name, value in method.extra_losses(batch).items():
            parts[name] = value.detach()
            loss = loss + value
        return loss

    def regularizers(pred_subject) -> dict:
        """Weighted SuDe, ClassDiffusion (docs/regularizers.md) and PDLoss terms: added once per step."""
        reg, out = config.regularizers, {}
        if reg.sude_weight > 0:
            value = _sude_term(config, backbone, text, pred_subject, noisy[:n_inst], timesteps[:n_inst],
                               captions[:n_inst], superclass, None if micro is None else micro[:n_inst])
            parts["sude"] = value.detach()
            out["sude"] = reg.sude_weight * value
        if reg.classdiffusion_weight > 0 and method.trains_text:
            value = _classdiffusion_term(backbone, personal, superclass, config.data.trigger)
            parts["classdiffusion"] = value.detach()
            out["classdiffusion"] = reg.classdiffusion_weight * value
        if pd_value is not None:
            out["pd"] = acc.pd_weight * pd_value
        return out

    def dd(pred_joint_rows, pred_personal, pred_general, pred_null):
        kw = {"sample": noisy[rows], "timesteps": timesteps[rows], "scheduler": backbone.noise_scheduler}
        value, comps = dd_loss(pred_joint_rows, pred_personal, pred_general, pred_null, scale=acc.dd_scale, **kw)
        parts["dd"] = value.detach()
        parts["dependence_shift"] = comps["dependence_shift"].mean()
        # Eq. 7 apart, nats per element (what `accord probe` reports)
        parts.update({f"eq7_{name}": v.mean() for name, v in comps["terms"].items()})
        return value

    pd_value = None
    if acc.pd_weight > 0 and method.learns_personal_embedding:
        pd_value = _pd_term(backbone, personal, general, superclass, config.data.trigger, method.personal_features(image))
        parts["pd"] = pd_value.detach()
    params = method.parameters() if measure_share else []

    if k == 0:
        with method.capture():
            pred_joint = backbone.predict(noisy, timesteps, cond)
        main, regs = diffusion(pred_joint), regularizers(pred_joint[:n_inst])
        parts.update(_shares(main, regs, params)[0])
        return StepLosses(total=main + sum(regs.values()), parts=parts)
    micro_rows = None if micro is None else micro[rows]
    image_rows = None if image is None else image[rows]
    cond_personal = method.attach(_with_micro(text(dd_personal, grad_text), micro_rows), image_rows)
    with torch.no_grad():
        cond_rest = Conditioning.cat([method.attach(_with_micro(text(dd_general, False), micro_rows), None),
                                      method.attach(_with_micro(text([""] * k, False), micro_rows), None)])
    if acc.mode == "fast" and acc.dd_personal_grad:
        with method.capture():
            pred = backbone.predict(torch.cat([noisy, noisy[rows]]), torch.cat([timesteps, timesteps[rows]]),
                                    Conditioning.cat([cond, cond_personal]))
        pred_joint, pred_personal = pred[: len(noisy)], pred[len(noisy):]
        with torch.no_grad():
            rest = backbone.predict(noisy[rows].repeat(2, *[1] * (noisy.dim() - 1)), timesteps[rows].repeat(2), cond_rest)
        pred_general, pred_null = rest[:k], rest[k:]
        main, regs = diffusion(pred_joint), regularizers(pred_joint[:n_inst])
        regs["dd"] = acc.dd_weight * dd(pred_joint[rows], pred_personal, pred_general, pred_null)
        parts.update(_shares(main, regs, params)[0])
        return StepLosses(total=main + sum(regs.values()), parts=parts)
    # lean: one forward with gradient alive at a time; the summed gradients equal fast mode's
    # (with accord.dd_personal_grad=False the first part is the whole step: c_p's pass has no gradient)
    with torch.no_grad():
        if cond_personal.embeds.shape[1:] == cond_rest.embeds.shape[1:]:
            rest = backbone.predict(noisy[rows].repeat(3, *[1] * (noisy.dim() - 1)), timesteps[rows].repeat(3),
                                    Conditioning.cat([cond_personal.detach(), cond_rest]))
        else:  # image tokens lengthen c_p's sequence (visual_encoder): two forwards
            rest = torch.cat([backbone.predict(noisy[rows], timesteps[rows], cond_personal.detach()),
                              backbone.predict(noisy[rows].repeat(2, *[1] * (noisy.dim() - 1)),
                                               timesteps[rows].repeat(2), cond_rest)])
    personal_d, pred_general, pred_null = rest[:k], rest[k: 2 * k], rest[2 * k:]
    with method.capture():
        pred_joint = backbone.predict(noisy, timesteps, cond)
    main, regs = diffusion(pred_joint), regularizers(pred_joint[:n_inst])
    regs["dd"] = acc.dd_weight * dd(pred_joint[rows], personal_d, pred_general, pred_null)
    loss = main + sum(regs.values())
    if not acc.dd_personal_grad:
        parts.update(_shares(main, regs, params)[0])
        return StepLosses(total=loss, parts=parts)
    # The second backward adds DDLoss's gradient through U(c_p); its share needs the first part's DD gradient.
    dd_first = _grads(regs["dd"], params) if params else None
    shares, main_norm = _shares(main, {n: v for n, v in regs.items() if n != "dd"}, params)
    parts.update(shares)
    joint_d = pred_joint[rows].detach()
    total = loss.detach()
    if torch.isfinite(loss):
        with accelerator.no_sync(backbone.denoiser):
            accelerator.backward(loss)
    del pred_joint, main, regs, loss
    image = method.reference_condition(batch)  # afresh: the first backward freed its graph
    pred_personal = backbone.predict(noisy[rows], timesteps[rows], method.attach(
        _with_micro(text(dd_personal, grad_text), micro_rows), None if image is None else image[rows]))
    second = acc.dd_weight * dd_loss(joint_d, pred_personal, pred_general, pred_null, sample=noisy[rows],
                                     timesteps=timesteps[rows], scheduler=backbone.noise_scheduler,
                                     scale=acc.dd_scale)[0]
    if dd_first is not None:
        parts["share_dd"] = _norm(dd_first, _grads(second, params)) / main_norm
    if torch.isfinite(total):
        accelerator.backward(second)
    return StepLosses(total=total, parts={**parts, "lean_backward_done": True})


def _grads(loss, params: list) -> list:
    """``∂loss/∂params`` without touching ``.grad`` (``None`` where a parameter is not reached)."""
    if not torch.is_tensor(loss) or not loss.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def _norm(*grad_lists) -> torch.Tensor:
    """The norm of the sum of gradient lists (float32)."""
    total = torch.zeros((), dtype=torch.float32)
    for together in zip(*grad_lists):
        present = [g.float() for g in together if g is not None]
        if present:
            total = total + sum(present[1:], present[0]).pow(2).sum().cpu()
    return total.sqrt()


def _shares(main, regs: dict, params: list) -> tuple[dict, torch.Tensor | None]:
    """``share_<name>``: ‖∇(w·L_name)‖ / ‖∇L_diffusion‖ on ``params``, and ‖∇L_diffusion‖ (``{}, None`` when no
    parameters are given: nothing measured)."""
    if not params:
        return {}, None
    main_norm = _norm(_grads(main, params)).clamp_min(1e-30)
    return {f"share_{name}": _norm(_grads(value, params)) / main_norm for name, value in regs.items()}, main_norm


def _superclass_prompts(prompts: list[str], superclass: str, trigger: str) -> list[str]:
    """Each prompt with the class noun in place of the trigger (c_s for PDLoss, SuDe, ClassDiffusion)."""
    from .data.captions import trigger_pattern

    # "1 sks backpack" → "1 backpack" (the noun already follows the trigger); "sks on a table" → "backpack on a table".
    pattern = re.compile(rf"{trigger_pattern(trigger).pattern}(\s+{re.escape(superclass)}(?!\w))?", re.IGNORECASE)
    return [" ".join(pattern.sub(superclass, p).split()) for p in prompts]


def _micro_conditions(batch: dict, class_batch: dict | None) -> torch.Tensor | None:
    """SDXL's size/crop conditioning per sample: original (h, w), crop top-left, target (h, w)."""
    if "original_size" not in batch:
        return None
    parts = [batch] + ([class_batch] if class_batch is not None else [])
    original = torch.cat([b["original_size"] for b in parts])
    crop = torch.cat([b["crop_top_left"] for b in parts])
    h, w = batch["pixel_values"].shape[-2:]
    target = torch.tensor([[h, w]]).repeat(original.shape[0], 1)
    return torch.cat([original, crop, target], dim=1)


def _with_micro(cond: Conditioning, micro: torch.Tensor | None) -> Conditioning:
    if cond.time_ids is None or micro is None:
        return cond
    return dataclasses.replace(cond, time_ids=micro.to(cond.time_ids.device, cond.time_ids.dtype))


def _pd_term(backbone, personal: list[str], general: list[str], superclass: str, trigger: str,
             f_p: torch.Tensor | None = None) -> torch.Tensor:
    """PDLoss: f_p from each c_p phrase (learned token inside) unless a method gives it (the projected
    image tokens of image-encoder methods), f_s from the same phrase with the class noun in place of the
    trigger (the class noun alone where c_p has no text), f_g from each other concept separately."""
    from .data.captions import split_phrases

    if f_p is None:
        f_p = backbone.projected_text_features(personal)
    supers = [s or superclass for s in _superclass_prompts(personal, superclass, trigger)]
    phrases = [split_phrases(g) for g in general]
    width = max(1, max(len(p) for p in phrases))
    flat = [ph for p in phrases for ph in p]
    with torch.no_grad():
        f_s = backbone.projected_text_features(supers)
        f_flat = backbone.projected_text_features(flat) if flat else None
    f_g = torch.zeros(len(personal), width, f_p.shape[-1], device=f_p.device, dtype=f_p.dtype)
    mask = torch.zeros(len(personal), width, dtype=torch.bool, device=f_p.device)
    i = 0
    for b, p in enumerate(phrases):
        for j in range(len(p)):
            f_g[b, j] = f_flat[i]
            mask[b, j] = True
            i += 1
    return pd_loss(f_p, f_s, f_g, mask=mask)[0]


def _sude_term(config: Config, backbone, text, pred_subject, noisy, timesteps, captions: list[str],
               superclass: str, micro: torch.Tensor | None) -> torch.Tensor:
    """SuDe: the category prompt (each caption with the class noun for the trigger) and the empty prompt
    on the same noisy samples, as one forward without gradient, against the subject (joint) prediction."""
    n = len(captions)
    with torch.no_grad():
        cond = Conditioning.cat([_with_micro(text(_superclass_prompts(captions, superclass, config.data.trigger), False),
                                             micro), _with_micro(text([""] * n, False), micro)])
        rest = backbone.predict(noisy.repeat(2, *[1] * (noisy.dim() - 1)), timesteps.repeat(2), cond)
    per, _ = sude_loss(pred_subject, rest[:n], rest[n:], timesteps=timesteps, scheduler=backbone.noise_scheduler,
                       truncation=_sude_truncation(config.regularizers), scale=config.accord.dd_scale)
    return per.mean()


def _sude_truncation(reg) -> str | float:
    return "category" if reg.sude_truncation == "category" else reg.sude_tau


def _classdiffusion_term(backbone, personal: list[str], superclass: str, trigger: str) -> torch.Tensor:
    """ClassDiffusion SPL: EOS features of each c_p phrase (with gradient) and of its class-noun version."""
    f_p = backbone.projected_text_features(personal)
    with torch.no_grad():
        f_c = backbone.projected_text_features(_superclass_prompts(personal, superclass, trigger))
    return classdiffusion_loss(f_p, f_c)[0].mean()


# ---------------------------------------------------------------------------- the loop


def _prepare_output_dir(config: Config, resume: str | None, is_main: bool) -> Path:
    out = Path(config.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir={out} is a file; choose a folder")
    if is_main:  # a folder under a file or without write permission is one line before the model loads
        writable_folder(out, "train.output_dir")
    holds_run = (out / CONFIG_FILE).is_file() or bool(list_checkpoints(out))
    if holds_run and resume is None and not config.train.overwrite_output_dir:
        raise ConfigError(f"train.output_dir={out} already holds a run; resume it with --resume latest, choose another "
                          "output_dir, or set train.overwrite_output_dir=true (its checkpoints are then replaced)")
    return out


def _make_optimizer(config: Config, params):
    from .optim import make_optimizer  # issue 20: train.optimizer (adamw, adamw8bit, prodigy, adafactor, schedule-free)

    return make_optimizer(config, params)


def build_model(config: Config, accelerator):
    """The backbone and the method set up as the loop trains them, from ``train.seed``: frozen weights in the autocast
    dtype on the accelerator's device, trained parameters in float32 (as diffusers' scripts do)."""
    t = config.train
    torch.manual_seed(t.seed)
    backbone = load_backbone(config.model, resolution=config.data.resolution, pd_clip=config.accord.pd_clip)
    method = get_method(config.method.name)(config, backbone)
    method.setup()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(t.mixed_precision, torch.float32)
    for module in backbone.frozen_modules():
        module.to(accelerator.device, **({} if weight_dtype == torch.float32 else {"dtype": weight_dtype}))
    for p in method.parameters():
        p.data = p.data.float()
    if t.gradient_checkpointing:
        backbone.denoiser.enable_gradient_checkpointing()
    return backbone, method


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 131 + micro) * 8191 + rank)


def train(config: Config, resume: str | None = None, progress: bool = True, resume_anyway: bool = False) -> Path:
    """Run a training job; returns the output folder holding the final weights. ``resume_anyway`` resumes even
    though the reference images changed since the checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    t = config.train
    out = Path(t.output_dir)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # a second train() in one process may use another precision (notebooks, tests)
    # Without an accelerator device, cpu=True lets torchrun / `accelerate launch --multi_gpu` start CPU DDP (gloo).
    no_device = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(
        cpu=no_device,
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=1,  # accumulation is explicit below (micro-batches are ours)
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    out = _prepare_output_dir(config, resume, accelerator.is_main_process)
    config_dict = config_to_dict(config)
    backbone, method = build_model(config, accelerator)
    if config.accord.pd_weight > 0 and not method.learns_personal_embedding:
        logger.warning("accord.pd_weight is set but method %s does not learn c_p; PDLoss is skipped", method.name)
    if config.regularizers.classdiffusion_weight > 0 and not method.trains_text:
        logger.warning("regularizers.classdiffusion_weight is set but method %s trains no text side (set "
                       "method.train_text_encoder=true); ClassDiffusion's loss is skipped", method.name)

    items, dataset, class_set = _build_data(config, accelerator, backbone, method)
    params = method.parameters()
    if not params:
        raise AccordError(f"method {method.name} has no trainable parameters; check method settings")
    optimizer = _make_optimizer(config, method.param_groups())
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.max_steps)
    prepared = accelerator.prepare(*method.trainable_modules(), optimizer)
    optimizer = prepared[-1]
    _rebind(backbone, method, prepared[:-1])

    start_step, nonfinite = 0, 0
    references = _fingerprint(config, items)
    if resume is not None:
        ckpt, state = resume_checkpoint(out, resume, method=method, optimizer=_inner(optimizer),
                                        lr_scheduler=lr_scheduler, config_dict=config_dict, references=references,
                                        resume_anyway=resume_anyway)
        start_step = state["step"]
        logger.info("resumed from %s at step %d", ckpt, start_step)
    if accelerator.is_main_process:
        write_config(out / CONFIG_FILE, config_dict)
        if t.report_to != "none":
            accelerator.init_trackers("accord", config={f"{s}.{k}": str(v) for s, sec in config_dict.items() for k, v in sec.items()})

    rank, world = accelerator.process_index, accelerator.num_processes
    batches = _Batches(dataset, t.batch_size, t.seed, rank, world, t.gradient_accumulation_steps)
    class_batches = (_Batches(class_set, t.batch_size, t.seed + 1, rank, world, t.gradient_accumulation_steps)
                     if class_set is not None else None)
    text = _TextCache(backbone, enabled=not method.trains_text)
    latent_cache = _LatentCache(backbone, enabled=t.cache_latents)
    share_every = config.accord.grad_share_every
    # Eq. 7's terms and the gradient shares: window means in train_summary.json, and the inert/falling warnings.
    monitor = TermsMonitor(config.accord.dd_weight, config.accord.dd_scale)
    if resume is not None:
        monitor.load_state_dict(state.get("monitor"))
    window = min(t.log_every, max(1, t.max_steps // 8))
    from .optim import eval_copy, eval_weights, set_mode  # issue 20: schedule-free optimizers train at y, save x

    set_mode(optimizer, training=True)  # issue 20
    bar = tqdm(total=t.max_steps, initial=start_step, desc="accord train", disable=not (progress and accelerator.is_main_process))
    last_log = time.time()
    for step in range(start_step, t.max_steps):
        torch.manual_seed(t.seed * 7919 + step * 31 + rank)  # dropout and anything else on the global RNG
        logs, skipped = {}, False
        measure = bool(share_every) and step % share_every == 0
        for micro in range(t.gradient_accumulation_steps):
            generator = _step_generator(t.seed, step, micro, rank)
            batch = batches.get(step, micro)
            class_batch = class_batches.get(step, micro) if class_batches else None
            with accelerator.autocast():
                losses = compute_step(config, backbone, method, text, batch, class_batch, generator, accelerator,
                                      config.data.class_noun, latent_cache, measure_share=measure and micro == 0)
            finite = torch.isfinite(losses.total).float()
            finite = accelerator.reduce(finite.to(accelerator.device), reduction="sum")
            if finite.item() < world:  # every rank skips together, so replicas stay identical
                skipped = True
                break
            if not losses.parts.pop("lean_backward_done", False):
                accelerator.backward(losses.total / t.gradient_accumulation_steps)
            for name, value in {"loss": losses.total, **losses.parts}.items():
                if name.startswith("share_"):  # measured on the first micro-batch only
                    logs[name] = float(value)
                else:
                    logs[name] = logs.get(name, 0.0) + float(value.detach()) / t.gradient_accumulation_steps
        if skipped:
            optimizer.zero_grad(set_to_none=True)
            nonfinite += 1
            logger.warning("step %d: non-finite loss, step skipped (%d in a row)", step + 1, nonfinite)
            if nonfinite >= t.max_nonfinite_steps:
                found = list_checkpoints(out)
                where = f"last good checkpoint: {found[-1]}" if found else "no checkpoint was written yet"
                raise AccordError(f"{nonfinite} non-finite losses in a row at step {step + 1} ({where}); lower "
                                  "train.learning_rate, use bf16 instead of fp16, or raise train.max_nonfinite_steps")
            bar.update(1)
            continue
        nonfinite = 0
        method.before_optimizer_step(step, optimizer)
        if t.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step()
        done = step + 1
        logs["lr"] = lr_scheduler.get_last_lr()[0]
        accelerator.log(logs, step=done)
        monitor.add(step, logs)
        if done % window == 0 or done == t.max_steps:
            monitor.close_window(done)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "dd", "pd", "dependence_shift")})
        if accelerator.is_main_process and (done % t.log_every == 0 or done == t.max_steps):
            # Eq. 7's terms go to the trackers and train_summary.json; the console keeps the personal one.
            shown = "  ".join(f"{k}={v:.5g}" for k, v in logs.items() if not k.startswith("eq7_") or k == "eq7_personal")
            bar.write(f"step {done}/{t.max_steps}  {shown}  ({time.time() - last_log:.1f}s)")
            last_log = time.time()
        if t.validation_every and done % t.validation_every == 0 and accelerator.is_main_process:
            from .validation import write_validation_grid

            with eval_copy(optimizer):  # issue 20
                write_validation_grid(config, backbone, out / "samples" / f"step-{done:06d}.png", accelerator=accelerator)
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.max_steps:
            accelerator.wait_for_everyone()
            with eval_weights(optimizer):  # issue 20: on every process
                if accelerator.is_main_process:
                    save_checkpoint(out, done, method=method, optimizer=_inner(optimizer), lr_scheduler=lr_scheduler,
                                    config_dict=config_dict, extra={"nonfinite": nonfinite, "references": references,
                                                                    "monitor": monitor.state_dict()},
                                    keep=t.checkpoints_total_limit)
    bar.close()
    set_mode(optimizer, training=False)  # issue 20: from here on the weights are schedule-free's x (what is saved)
    if accelerator.is_main_process:
        monitor.finish()
    accelerator.wait_for_everyone()
    # Replicas must hold identical weights after DDP training; check it instead of assuming it.
    from accelerate.utils import gather_object

    checksums = gather_object([_checksum(method.trainable_state())])
    if len(set(checksums)) > 1:
        logger.warning("processes ended with different weights: %s", checksums)
    if accelerator.is_main_process:
        written = method.save(out)
        summary = {"steps": t.max_steps, "skipped_final_steps": nonfinite, "num_processes": world,
                   "replica_checksums": checksums, "replicas_identical": len(set(checksums)) == 1,
                   "outputs": [p.name for p in written], "eq7": monitor.trajectory,
                   "warnings": sorted(monitor.warned)}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        logger.info("wrote %s", ", ".join(str(p) for p in written))
    # No process leaves before the main one has written: a rank exiting right after gather_object could let a Gloo
    # worker thread free that all-gather's Python-owned tensors during interpreter shutdown, which aborts the
    # process (SIGABRT, "terminate called without an active exception"; on 2 CPU cores 1 of 72 runs of the DDP
    # test's command, 3 of 59 of a minimal torchrun script) and makes torchrun kill the main process mid-save.
    # The barrier waits for that all-gather to finish first.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if nonfinite:  # the weights written are the last good ones, but the run did not finish as asked
        raise AccordError(f"the last {nonfinite} step(s) had non-finite losses and were skipped; {out} holds the "
                          f"weights of step {t.max_steps - nonfinite}, the last good one; lower train.learning_rate or "
                          "use bf16 instead of fp16")
    return out


def _fingerprint(config: Config, items) -> dict | None:
    """The reference images' fingerprint kept in checkpoints (None for a method's own dataset)."""
    if not items:
        return None
    from .data.references import reference_fingerprint

    return reference_fingerprint(items, config.data.instance_dir)


def _checksum(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def _rebind(backbone, method, prepared) -> None:
    """Point the backbone at accelerate's wrapped modules (DDP), matching by identity of the inner module."""
    from accelerate.utils import extract_model_from_parallel

    method.rebind(list(prepared))
    for wrapped in prepared:
        inner = extract_model_from_parallel(wrapped)
        if inner is extract_model_from_parallel(backbone.denoiser):
            backbone.denoiser = wrapped
        for i, enc in enumerate(backbone.text_encoders):
            if inner is extract_model_from_parallel(enc):
                backbone.text_encoders[i] = wrapped
