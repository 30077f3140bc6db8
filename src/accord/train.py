"""The training loop: one read from top to bottom. Backbones, methods and losses plug in.

Every random draw of step ``s`` comes from generators seeded by ``(seed, s, rank)`` and the data
order from ``(seed, epoch)``, so a run resumed from a checkpoint repeats the uninterrupted run
exactly (bitwise on the CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbones import load_backbone
from .checkpoint import CONFIG_FILE, list_checkpoints, resume_checkpoint, save_checkpoint, write_config
from .config import Config, config_to_dict
from .ema import averaged, make_ema
from .errors import AccordError, ConfigError
from .methods import get_method
from .monitor import TermsMonitor
from .output import writable_folder
from .step import LatentCache, TextCache, pd_applies, run_step

logger = logging.getLogger("accord.train")

__all__ = ["train", "build_model", "Trainer"]


# ---------------------------------------------------------------------------- data


class _Batches:
    """Micro-batches by (step, micro, rank): epoch permutations seeded by (seed, epoch).

    With aspect-ratio buckets, each micro-batch is one of ``BucketBatchSampler``'s same-size batches. A streamed
    dataset (``stream_samples(start, count)``, e.g. :class:`accord.data.streamed.StreamedCaptions`) is this rank's
    shard read in order: micro-batch (step, micro) is its samples from
    ``(step * accumulation + micro) * batch_size``."""

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
    from .data.folders import caption_options, scan_instance_dirs
    from .data.references import ReferenceDataset

    d = config.data
    own = method.build_dataset(config) if method is not None else None
    if own is not None:  # e.g. an image–caption set for zero-shot IP-Adapter training
        return [], own, None
    items = scan_instance_dirs(d)  # data.instance_dir and data.instance_dirs (repeats, weight, trigger)
    buckets = None
    if d.buckets:
        from .data.images import make_buckets

        # kohya's 64-pixel step at 512 px and above; finer below so small resolutions still get several buckets.
        buckets = make_buckets(d.resolution, step=min(64, max(8, d.resolution // 64 * 8)))
    dataset = ReferenceDataset(items, d.resolution, center_crop=d.center_crop, random_flip=d.random_flip,
                               buckets=buckets, seed=config.train.seed, **caption_options(d))
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
    from .optim import make_optimizer  # train.optimizer: adamw, adamw8bit, prodigy, adafactor, schedule-free

    return make_optimizer(config, params)


def build_model(config: Config, accelerator):
    """The backbone and the method set up as the loop trains them, from ``train.seed``: frozen weights in the autocast
    dtype on the accelerator's device, trained parameters in float32 (as diffusers' scripts do)."""
    t = config.train
    torch.manual_seed(t.seed)
    from .quantize import is_quantized, quantize_frozen

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(t.mixed_precision, torch.float32)
    backbone = load_backbone(config.model, resolution=config.data.resolution, pd_clip=config.accord.pd_clip,
                             compute_dtype=weight_dtype)
    quantize_frozen(backbone, config.model.quantize, weight_dtype, accelerator.device)  # before LoRA wraps the layers
    method = get_method(config.method.name)(config, backbone)
    method.setup()
    for module in backbone.frozen_modules():
        # a quantized module is already in the autocast dtype (and diffusers refuses to cast a 4-bit one)
        cast = weight_dtype != torch.float32 and not is_quantized(module)
        module.to(accelerator.device, **({"dtype": weight_dtype} if cast else {}))
    for p in method.parameters():
        p.data = p.data.float()
    if t.gradient_checkpointing:
        backbone.denoiser.enable_gradient_checkpointing()
    return backbone, method


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 131 + micro) * 8191 + rank)


class Trainer:
    """One optimizer step at a time, on models, optimizer and data built once (:func:`train` builds them from a
    config; ``benchmarks/overhead.py`` times :meth:`step` on its own).

    ``batches``/``class_batches`` give micro-batch ``(step, micro)`` through ``get``. :meth:`step` runs the
    micro-batches through :func:`accord.step.run_step`, whose schedule runs the backward passes through
    :meth:`backward`, then clips, steps the optimizer and the learning-rate schedule, and updates ``ema``
    (:class:`accord.ema.Ema`, ``train.ema_decay``) where there is one.
    """

    def __init__(self, config: Config, accelerator, backbone, method, optimizer, lr_scheduler, batches,
                 class_batches=None, ema=None):
        self.config, self.accelerator, self.backbone, self.method = config, accelerator, backbone, method
        self.optimizer, self.lr_scheduler, self.ema = optimizer, lr_scheduler, ema
        self.batches, self.class_batches = batches, class_batches
        self.params = method.parameters()
        self.text = TextCache(backbone, enabled=not method.trains_text)
        self.latent_cache = LatentCache(backbone, enabled=config.train.cache_latents)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self._sync_now = True

    def backward(self, loss: torch.Tensor, last: bool) -> bool:
        """Backward of ``loss / accumulation`` once every rank's loss is finite (all ranks skip together, so
        replicas stay identical); DDP synchronises gradients on the optimizer step's final piece only."""
        accelerator = self.accelerator
        finite = accelerator.reduce(torch.isfinite(loss.detach()).float().to(accelerator.device), reduction="sum")
        if finite.item() < self.world:
            return False
        sync = last and self._sync_now
        with contextlib.nullcontext() if sync else accelerator.no_sync(self.backbone.denoiser):
            accelerator.backward(loss / self.config.train.gradient_accumulation_steps)
        return True

    def step(self, step: int, measure_share: bool = False) -> dict | None:
        """Optimizer step ``step`` (0-based): its logs, or ``None`` where a non-finite loss skipped it (gradients
        dropped). ``measure_share``: also measure the gradient shares, on the first micro-batch."""
        t, accelerator = self.config.train, self.accelerator
        torch.manual_seed(t.seed * 7919 + step * 31 + self.rank)  # dropout and anything else on the global RNG
        logs: dict = {}
        for micro in range(t.gradient_accumulation_steps):
            self._sync_now = micro == t.gradient_accumulation_steps - 1
            batch = self.batches.get(step, micro)
            class_batch = self.class_batches.get(step, micro) if self.class_batches else None
            with accelerator.autocast():
                losses = run_step(self.config, self.backbone, self.method, self.text, batch, class_batch,
                                  _step_generator(t.seed, step, micro, self.rank), self.config.data.class_noun,
                                  self.backward, self.latent_cache, measure_share=measure_share and micro == 0)
            if not losses.finite:
                self.optimizer.zero_grad(set_to_none=True)
                return None
            for name, value in {"loss": losses.total, **losses.parts}.items():
                if name.startswith("share_"):  # measured on the first micro-batch only
                    logs[name] = float(value)
                else:
                    logs[name] = logs.get(name, 0.0) + float(value.detach()) / t.gradient_accumulation_steps
        self.method.before_optimizer_step(step, self.optimizer)
        if t.max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.params, t.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_optimizer_step()
        if self.ema is not None:
            self.ema.update()
            logs["ema_decay"] = self.ema.decay
        logs["lr"] = self.lr_scheduler.get_last_lr()[0]
        return logs


@dataclass
class _Run:
    """What :func:`train` sets up before its loop."""

    accelerator: object
    out: Path
    trainer: Trainer
    monitor: TermsMonitor
    config_dict: dict
    references: dict | None
    start_step: int


def _setup(config: Config, resume: str | None, resume_anyway: bool) -> _Run:
    """The accelerator, output folder, models, data, optimizer and trackers; state restored from ``resume``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler

    t = config.train
    out = Path(t.output_dir)
    AcceleratorState._reset_state()  # a second train() in one process may use another precision (notebooks, tests)
    # Without an accelerator device, cpu=True lets torchrun / `accelerate launch --multi_gpu` start CPU DDP (gloo).
    no_device = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(
        cpu=no_device,
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=1,  # accumulation is explicit (micro-batches are ours)
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    out = _prepare_output_dir(config, resume, accelerator.is_main_process)
    config_dict = config_to_dict(config)
    backbone, method = build_model(config, accelerator)
    if config.accord.pd_weight > 0 and not pd_applies(method):
        logger.warning("accord.pd_weight is set but method %s does not learn c_p (set method.train_text_encoder=true "
                       "to train the trigger's text features); PDLoss is skipped", method.name)
    if config.regularizers.classdiffusion_weight > 0 and not method.trains_text:
        logger.warning("regularizers.classdiffusion_weight is set but method %s trains no text side (set "
                       "method.train_text_encoder=true); ClassDiffusion's loss is skipped", method.name)
    items, dataset, class_set = _build_data(config, accelerator, backbone, method)
    if not method.parameters():
        raise AccordError(f"method {method.name} has no trainable parameters; check method settings")
    optimizer = _make_optimizer(config, method.param_groups())
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer=optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=t.max_steps)
    prepared = accelerator.prepare(*method.trainable_modules(), optimizer)
    optimizer = prepared[-1]
    _rebind(backbone, method, prepared[:-1])

    start_step, references, state = 0, _fingerprint(config, items), {}
    ema = make_ema(config, method.parameters())  # train.ema_decay
    if resume is not None:
        ckpt, state = resume_checkpoint(out, resume, method=method, optimizer=_inner(optimizer),
                                        lr_scheduler=lr_scheduler, config_dict=config_dict, references=references,
                                        resume_anyway=resume_anyway, ema=ema)
        start_step = state["step"]
        logger.info("resumed from %s at step %d", ckpt, start_step)
    if accelerator.is_main_process:
        write_config(out / CONFIG_FILE, config_dict)
        if t.report_to != "none":
            _init_trackers(accelerator, t.report_to, out, config_dict)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = _Batches(dataset, t.batch_size, t.seed, rank, world, t.gradient_accumulation_steps)
    class_batches = (_Batches(class_set, t.batch_size, t.seed + 1, rank, world, t.gradient_accumulation_steps)
                     if class_set is not None else None)
    trainer = Trainer(config, accelerator, backbone, method, optimizer, lr_scheduler, batches, class_batches, ema)
    # Eq. 7's terms and the gradient shares: window means in train_summary.json, and the inert/falling warnings.
    monitor = TermsMonitor(config.accord.dd_weight, config.accord.dd_scale, dd_variant=config.accord.dd_variant)
    monitor.load_state_dict(state.get("monitor"))
    return _Run(accelerator, out, trainer, monitor, config_dict, references, start_step)


def _init_trackers(accelerator, report_to: str, out: Path, config_dict: dict) -> None:
    """accelerate's tracker for ``train.report_to``; a wandb run goes to ``out/logs`` unless ``WANDB_DIR`` is set."""
    import os

    init_kwargs = {}
    if report_to == "wandb":
        init_kwargs["wandb"] = {"name": out.name}
        if not os.environ.get("WANDB_DIR"):
            (out / "logs").mkdir(parents=True, exist_ok=True)
            init_kwargs["wandb"]["dir"] = str(out / "logs")
    flat = {f"{s}.{k}": str(v) for s, sec in config_dict.items() for k, v in sec.items()}
    try:
        accelerator.init_trackers("accord", config=flat, init_kwargs=init_kwargs)
    except Exception as exc:  # wandb without a login or network: one line, not wandb's traceback
        if report_to != "wandb":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"train.report_to=wandb: wandb could not start ({first}); run `wandb login`, or set "
                          "WANDB_MODE=offline to keep the run on disk (wandb sync uploads it later)") from None


def train(config: Config, resume: str | None = None, progress: bool = True, resume_anyway: bool = False) -> Path:
    """Run a training job; returns the output folder holding the final weights. ``resume_anyway`` resumes even
    though the reference images changed since the checkpoint."""
    from tqdm.auto import tqdm

    t = config.train
    run = _setup(config, resume, resume_anyway)
    accelerator, out, trainer, monitor = run.accelerator, run.out, run.trainer, run.monitor
    main = accelerator.is_main_process
    window, share_every = min(t.log_every, max(1, t.max_steps // 8)), config.accord.grad_share_every
    from .optim import eval_copy, eval_weights, set_mode  # schedule-free optimizers train at y and save x

    set_mode(trainer.optimizer, training=True)
    bar = tqdm(total=t.max_steps, initial=run.start_step, desc="accord train", disable=not (progress and main))
    nonfinite, last_log = 0, time.time()
    for step in range(run.start_step, t.max_steps):
        logs = trainer.step(step, measure_share=bool(share_every) and step % share_every == 0)
        bar.update(1)
        if logs is None:
            nonfinite += 1
            _nonfinite_step(out, step, nonfinite, t.max_nonfinite_steps)
            continue
        nonfinite, done = 0, step + 1
        accelerator.log(logs, step=done)
        monitor.add(step, logs)
        if done % window == 0 or done == t.max_steps:
            monitor.close_window(done)
        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "dd", "pd", "dependence_shift")})
        if main and (done % t.log_every == 0 or done == t.max_steps):
            # Eq. 7's terms go to the trackers and train_summary.json; the console keeps the personal one.
            shown = "  ".join(
                f"{k}={v:.5g}" for k, v in logs.items() if not k.startswith("eq7_") or k == "eq7_personal"
            )
            bar.write(f"step {done}/{t.max_steps}  {shown}  ({time.time() - last_log:.1f}s)")
            last_log = time.time()
        if main and t.validation_every and done % t.validation_every == 0:
            from .validation import write_validation_grid

            with eval_copy(trainer.optimizer), averaged(trainer.ema):
                write_validation_grid(config, trainer.backbone, out / "samples" / f"step-{done:06d}.png",
                                      accelerator=accelerator)
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.max_steps:
            accelerator.wait_for_everyone()
            with eval_weights(trainer.optimizer):  # on every process
                if main:
                    save_checkpoint(out, done, method=trainer.method, optimizer=_inner(trainer.optimizer),
                                    lr_scheduler=trainer.lr_scheduler, config_dict=run.config_dict,
                                    extra={"nonfinite": nonfinite, "references": run.references,
                                           "monitor": monitor.state_dict()}, keep=t.checkpoints_total_limit,
                                    ema=trainer.ema)
    bar.close()
    set_mode(trainer.optimizer, training=False)  # from here on the weights are schedule-free's x (what is saved)
    return _finish(run, nonfinite)


def _nonfinite_step(out: Path, step: int, in_a_row: int, limit: int) -> None:
    logger.warning("step %d: non-finite loss, step skipped (%d in a row)", step + 1, in_a_row)
    if in_a_row >= limit:
        found = list_checkpoints(out)
        where = f"last good checkpoint: {found[-1]}" if found else "no checkpoint was written yet"
        raise AccordError(f"{in_a_row} non-finite losses in a row at step {step + 1} ({where}); lower "
                          "train.learning_rate, use bf16 instead of fp16, or raise train.max_nonfinite_steps")


def _finish(run: _Run, nonfinite: int) -> Path:
    """Check the replicas agree, write the outputs and train_summary.json, end the trackers."""
    from accelerate.utils import gather_object

    accelerator, out, method, t = run.accelerator, run.out, run.trainer.method, run.trainer.config.train
    if accelerator.is_main_process:
        run.monitor.finish()
    accelerator.wait_for_everyone()
    # Replicas must hold identical weights after DDP training; check it instead of assuming it.
    checksums = gather_object([_checksum(method.trainable_state())])
    if len(set(checksums)) > 1:
        logger.warning("processes ended with different weights: %s", checksums)
    if accelerator.is_main_process:
        with averaged(run.trainer.ema):  # train.ema_decay: the outputs are the averaged weights
            written = method.save(out)
        summary = {"steps": t.max_steps, "skipped_final_steps": nonfinite, "num_processes": accelerator.num_processes,
                   "replica_checksums": checksums, "replicas_identical": len(set(checksums)) == 1,
                   "outputs": [p.name for p in written], "eq7": run.monitor.trajectory,
                   "warnings": sorted(run.monitor.warned)}
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
