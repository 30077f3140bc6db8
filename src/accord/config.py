"""Typed training configuration: dataclasses with help text, validated at the edge.

One class tree backs the YAML file and ``--set key=value`` overrides. Unknown keys are rejected
with the key path, the allowed keys and the fix; bad values name the key, the value and the
allowed values. ``accord train --help-config`` prints every key with its meaning.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import ConfigError

__all__ = ["Config", "load_config", "config_to_dict", "describe_keys", "apply_overrides"]


def _f(default, help: str, choices: tuple | None = None, **kwargs):
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


# train._step_generator seeds each step with about seed * 1.07e12; torch's generators take 64-bit seeds.
SEED_LIMIT = 10_000_000

BACKBONES = ("auto", "sd", "sdxl", "flux", "sd3")
PREDICTION_TYPES = (None, "epsilon", "v_prediction", "sample")


@dataclass
class ModelConfig:
    pretrained: str = _f(
        "", "base model: a Hugging Face hub id, a local diffusers folder, or a single .safetensors file")
    backbone: str = _f("auto", "model family; 'auto' reads it from the model", BACKBONES)
    revision: str | None = _f(None, "hub revision (branch, tag or commit)")
    variant: str | None = _f(None, "weight variant to load, e.g. 'fp16'")
    single_file_config: str | None = _f(
        None, "for a single .safetensors file: a local diffusers folder (or hub id) holding the matching configs"
    )
    prediction_type: str | None = _f(
        None, "override the scheduler's prediction type (e.g. 'v_prediction' for SD 2.x-768)", PREDICTION_TYPES
    )
    flux_guidance: float = _f(
        1.0, "FLUX.1-dev (guidance-distilled): the value fed to its guidance embedding during training "
        "(diffusers' train_dreambooth_lora_flux.py uses 1.0); unused by models without one"
    )
    max_sequence_length: int | None = _f(
        None, "FLUX/SD3: T5 tokens per prompt (default: the pipeline's, 512 for FLUX.1-dev, 256 for FLUX.1-schnell "
        "and SD3); fewer train faster when captions are short (accord generate reads it from the run)"
    )
    quantize: str = _f(
        "none", "store the frozen base in fewer bits, LoRA on top in full precision (method lora only): int8 is "
        "torchao's weight-only int8 of the denoiser and T5 (CPU and GPU; pip install 'accord[quant]'), nf4 is "
        "bitsandbytes' 4-bit NormalFloat applied at load (CUDA GPU only; pip install 'accord[bnb]'); docs/memory.md",
        ("none", "int8", "nf4")
    )


@dataclass
class DataConfig:
    instance_dir: str = _f("", "folder of reference images (+ optional .txt captions or metadata.jsonl)")
    trigger: str = _f("sks", "trigger word of the personal concept; the caption phrase holding it is c_p")
    class_noun: str = _f("", "superclass noun, e.g. 'backpack' (c_s; default captions and PDLoss)")
    resolution: int = _f(512, "training resolution in pixels (square unless buckets are on)")
    center_crop: bool = _f(True, "center crop after resizing (False: random crop)")
    random_flip: bool = _f(False, "random horizontal flips")
    buckets: bool = _f(False, "aspect-ratio buckets instead of square crops")
    on_bad_image: str = _f(
        "error", "what to do with unreadable images: stop with an error or skip with a warning", ("error", "skip"))
    with_prior_preservation: bool = _f(False, "add the class-prior loss on class images (DreamBooth, Custom Diffusion)")
    class_dir: str | None = _f(None, "folder of class images; generated there by the base model when short")
    class_prompt: str | None = _f(None, "prompt of the class images; default 'a {class_noun}'")
    num_class_images: int = _f(100, "number of class images to use (missing ones are generated)")
    prior_loss_weight: float = _f(1.0, "weight of the class-prior loss")
    masked_loss: bool = _f(
        False, "weigh the diffusion loss by each reference's mask (metadata.jsonl 'mask' or data.mask_dir; white = "
        "subject): 1 inside, data.unmasked_weight outside; images without a mask train on the whole image "
        "(lora, dreambooth, textual_inversion, custom_diffusion, visual_encoder)"
    )
    mask_dir: str | None = _f(
        None, "with data.masked_loss: a folder of kohya-style masks named like their images (00.jpg -> 00.png)"
    )
    unmasked_weight: float = _f(0.0, "with data.masked_loss: weight of the diffusion loss outside the mask (0..1)")
    instance_dirs: list = _f(
        [], "more reference folders, each {path, repeats (times per epoch, 1), weight (loss weight, 1), trigger, "
        "class_noun (default: data.trigger / data.class_noun)}; data.instance_dir, if set, is one more with the "
        "defaults"
    )
    caption_dropout: float = _f(
        0.0, "probability that a sample trains on the empty caption (no DD term for it; logged as captions_dropped)"
    )
    shuffle_phrases: bool = _f(
        False, "shuffle each caption's c_g phrases every epoch; the trigger phrase c_p stays first")
    keep_phrases: int = _f(
        0, "with shuffle_phrases: the first N c_g phrases stay in place after c_p (kohya's keep_tokens)")


#: the method of a config whose ``method`` section names none
DEFAULT_METHOD = "lora"


@dataclass
class MethodOptions:
    """The ``method:`` section: ``name`` picks a registered method; the other keys are that method's own.

    Each method module defines a subclass with its keys (``_f`` fields with help text) and the checks of
    its keys against the rest of the config (:meth:`validate`), and sets it as its method class's
    ``options`` (:func:`accord.methods.base.register`); ``config.method`` is an instance of the chosen one.
    """

    name: str = _f("", "what is trained: one of the registered methods; each has its own keys, listed under it below")
    #: the method these are the options of (set by register on the subclass)
    method_name: ClassVar[str] = ""
    #: data.masked_loss weighs this method's diffusion loss
    supports_masked_loss: ClassVar[bool] = False
    #: why data.masked_loss is refused (where it is not supported), after the method's name
    no_masked_loss: ClassVar[str] = "does not weigh its diffusion loss by masks"
    #: data.instance_dirs folders may carry their own trigger / class_noun
    folder_triggers: ClassVar[bool] = False
    #: model.quantize may quantize the base: the method trains adapters beside it, never base weights
    quantizable_base: ClassVar[bool] = False

    def __post_init__(self) -> None:
        own = type(self).__dict__.get("method_name", "")  # set by accord.methods.base.register
        if not self.name:
            self.name = own
        elif own and self.name != own:
            raise ConfigError(f"method.name={self.name!r} does not match {type(self).__name__}, the options of {own}")

    def reads_instance_dir(self) -> bool:
        """Whether the run trains on ``data.instance_dir`` / ``data.instance_dirs`` (not a dataset of its own)."""
        return True

    def validate(self, config: Config) -> None:
        """Checks of this method's keys against the rest of ``config`` (called by :meth:`Config.validate`)."""


@dataclass
class AccordConfig:
    dd_weight: float = _f(0.0, "DDLoss weight (paper: 0.1-0.3); 0 disables and skips its passes")
    pd_weight: float = _f(0.0, "PDLoss weight (paper: 0.001-0.003); 0 disables; for methods that train c_p "
                                 "(a learned token or image feature, or the text encoder)")
    dd_scale: str = _f(
        "reference", "scale of DDLoss and SuDe, the one the paper's weights refer to by default: 'reference' is "
        "Facechain-SuDe's official convention (Delta per element, divided by the posterior coefficient m_t on x0); "
        "'mean' is Delta per element only (~500x weaker on SD's schedule: the paper's weights do nothing there); "
        "'sum' keeps nats", ("reference", "mean", "sum")
    )
    dd_variant: str = _f(
        "paper", "form of DDLoss (docs/regularizers.md): 'paper' is Eq. 8 as written, (t/T)|Delta|; 'anchored' "
        "matches Delta to the superclass's under the base model; 'alignment' matches <p,g> to the superclass's; "
        "'composition' is the joint step's distance from the sum of the single-concept steps; 'frozen_personal' "
        "is Eq. 8 with U(c_p) stop-gradient; 'conditional' matches what c_g changes given c_p to what it changes "
        "given the superclass under the base model",
        ("paper", "anchored", "alignment", "composition", "frozen_personal", "conditional")
    )
    dd_batch: int | None = _f(
        None, "samples of each batch that get the DD term (its personal/general/empty passes); default all"
    )
    mode: str = _f(
        "fast",
        "'fast': joint+personal in one forward with gradient, general+empty in one forward without; "
        "'lean': one forward with gradient at a time (two backwards, same gradient, ~plain peak memory)",
        ("fast", "lean"),
    )
    pd_clip: str | None = _f(
        None, "CLIP model with a text projection for PDLoss when the backbone's text encoder has none (SD 1.x/2.x)"
    )
    grad_share_every: int = _f(
        50, "every N steps, measure each regularizer's gradient norm relative to the diffusion loss's on the trained "
        "parameters (logged as share_dd, share_pd, ...; one extra forward and a backward per regularizer on those "
        "steps); 0 disables"
    )


@dataclass
class RegularizerConfig:
    """Comparator regularizers from other papers, in the same loop (docs/regularizers.md)."""

    sude_weight: float = _f(
        0.0, "Facechain-SuDe derived-class loss weight (Qiao et al. 2024; official code's default 0.4, its README "
        "0.8); on accord.dd_scale's scale (theirs is 'reference'); 0 disables and skips its class-prompt and "
        "empty-prompt passes"
    )
    sude_truncation: str = _f(
        "category", "SuDe loss truncation: 'category' (the official code's rule) keeps a sample's term only where it "
        "exceeds the category prediction's own value; 'fixed' keeps it where -log p(class | x_t-1) exceeds "
        "regularizers.sude_tau nats", ("category", "fixed")
    )
    sude_tau: float = _f(
        0.0, "SuDe's fixed truncation threshold in nats, with sude_truncation=fixed (0: probability 1)")
    classdiffusion_weight: float = _f(
        0.0, "ClassDiffusion semantic preservation loss weight (1 - cos of personal and class phrase features); "
        "0 disables; for methods that train the text side"
    )


@dataclass
class TrainConfig:
    output_dir: str = _f("accord-output", "where checkpoints, logs, samples and the final weights go")
    overwrite_output_dir: bool = _f(False, "allow starting a new run in a folder that already holds one")
    seed: int = _f(0, "random seed (data order, noise, timesteps, augmentations)")
    max_steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(1, "reference images per step and process")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    learning_rate: float = _f(
        1e-4, "learning rate (the denoiser's; prodigy: a multiplier of its own estimate, use 1.0)")
    optimizer: str = _f(
        "adamw", "torch AdamW, bitsandbytes 8-bit AdamW (pip install 'accord[bnb]'), Prodigy, transformers' Adafactor "
        "(fixed learning rate), or schedule-free AdamW (pip install 'accord[optim]'; with lr_scheduler=constant)",
        ("adamw", "adamw8bit", "prodigy", "adafactor", "adamw_schedulefree"))
    text_encoder_lr: float | None = _f(
        None, "learning rate of the text encoders' trained weights (method.train_text_encoder); null: learning_rate")
    embedding_lr: float | None = _f(
        None, "learning rate of learned token embeddings (textual_inversion, custom_diffusion's token, break_a_scene's "
        "phase 2; phase 1 keeps method.bas_phase1_lr); null: learning_rate")
    prodigy_d_coef: float = _f(1.0, "prodigy: d_coef, scales its step-size estimate")
    prodigy_use_bias_correction: bool = _f(False, "prodigy: Adam's bias correction")
    prodigy_safeguard_warmup: bool = _f(False, "prodigy: no d growth from the warm-up steps (use with lr_warmup_steps)")
    lr_scheduler: str = _f(
        "constant", "diffusers learning-rate schedule", ("constant", "constant_with_warmup", "linear", "cosine"))
    lr_warmup_steps: int = _f(0, "warm-up steps of the learning-rate schedule")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    use_8bit_adam: bool = _f(False, "deprecated: the same as train.optimizer=adamw8bit")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    mixed_precision: str = _f("no", "autocast precision", ("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet")
    timestep_sampling: str = _f(
        "uniform", "how training timesteps are drawn (paper Tab. 12)", ("uniform", "logit_normal"))
    logit_mean: float = _f(0.0, "logit-normal m")
    logit_std: float = _f(1.0, "logit-normal s")
    timestep_shift: float | None = _f(
        None, "flux/sd3: SD3's timestep shift s, u -> s*u/(1+(s-1)*u) on the drawn grid fraction (kohya's "
        "discrete_flow_shift; 3.0 favours noisier steps; on top of SD3's own shifted grid); null: off"
    )
    min_timestep: int | None = _f(
        None, "lowest training timestep (DDPM index for sd/sdxl, sigma*1000 for flux/sd3); null: 0"
    )
    max_timestep: int | None = _f(
        None, "highest training timestep (sd/sdxl: exclusive index bound, at most 1000; flux/sd3: sigma*1000 "
        "inclusive); null: the whole schedule"
    )
    snr_gamma: float | None = _f(None, "min-SNR weighting gamma (e.g. 5.0); None disables")
    noise_offset: float = _f(0.0, "noise offset (e.g. 0.05); 0 disables")
    cache_latents: bool = _f(False, "encode each reference once (only without random crops/flips)")
    checkpoint_every: int = _f(500, "save a resumable checkpoint every N steps (0: only at the end)")
    checkpoints_total_limit: int | None = _f(3, "keep at most this many checkpoints (None: keep all)")
    validation_every: int = _f(0, "write a validation sample grid every N steps (0: off)")
    validation_prompts: list = _f([], "validation prompts; '{trigger}' and '{class_noun}' are filled in")
    validation_steps: int = _f(25, "inference steps of validation samples")
    validation_guidance: float = _f(7.5, "classifier-free guidance of validation samples")
    log_every: int = _f(10, "console log every N steps")
    report_to: str = _f(
        "tensorboard", "where the step scalars (loss, eq7_*, share_*, lr) and validation grids go, through "
        "accelerate's trackers: TensorBoard event files in output_dir/logs, Weights & Biases (pip install "
        "'accord[wandb]'; WANDB_MODE=offline works without network, the run is kept in output_dir/logs/wandb "
        "unless WANDB_DIR is set), or nothing", ("tensorboard", "wandb", "none"))
    ema_decay: float = _f(
        0.0, "exponential moving average of the trained weights (e.g. 0.9999; diffusers' EMAModel): the outputs, "
        "final and in checkpoints, are the EMA weights; the decay applied at update n is min(ema_decay, n/(n+9)) "
        "(the first update copies the weights); 0: off")
    ema_on_cpu: bool = _f(False, "with ema_decay: keep the EMA copy in CPU memory (the update runs there)")
    max_nonfinite_steps: int = _f(5, "stop after this many non-finite losses in a row (each one's step is skipped)")
    dataloader_workers: int = _f(0, "data loader worker processes")

    def validate(self) -> None:
        """Numbers the loop and AdamW would turn into a traceback, or silently into no training."""
        lr = self.learning_rate
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"train.learning_rate={lr} must be a positive finite number, e.g. 1e-4")
        for key in ("weight_decay", "adam_epsilon", "max_grad_norm"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"train.{key}={value} must be a finite number >= 0")
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise ConfigError(f"train.{key}={value} is outside [0, 1); AdamW's defaults are 0.9 and 0.999")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"train.seed={self.seed} is out of range; use an integer from 0 to {SEED_LIMIT - 1} "
                              "(each step's 64-bit generator seeds are derived from it)")
        for key in ("checkpoint_every", "lr_warmup_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} is negative; use 0 or a positive number of steps")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(f"train.checkpoints_total_limit={self.checkpoints_total_limit}: keep at least 1 "
                              "checkpoint, or null to keep all")
        if self.timestep_shift is not None and not (math.isfinite(self.timestep_shift) and self.timestep_shift > 0):
            raise ConfigError(f"train.timestep_shift={self.timestep_shift} must be a positive number (1: no shift, "
                              "3.0: SD3's), or null")
        lo, hi = self.min_timestep, self.max_timestep
        if ((lo is not None and lo < 0) or (hi is not None and hi < 1)
                or (lo is not None and hi is not None and lo >= hi)):
            raise ConfigError(f"train.min_timestep={lo} / train.max_timestep={hi}: need 0 <= min_timestep < "
                              "max_timestep, e.g. 0 and 1000")
        from .optim import check_optimizer_config

        check_optimizer_config(self)
        if not (math.isfinite(self.ema_decay) and 0 <= self.ema_decay < 1):
            raise ConfigError(f"train.ema_decay={self.ema_decay} is outside [0, 1); use 0 (off) or e.g. 0.9999")
        if self.ema_on_cpu and not self.ema_decay:
            raise ConfigError("train.ema_on_cpu is set but train.ema_decay=0 (EMA off); set train.ema_decay, e.g. "
                              "0.9999, or unset train.ema_on_cpu")
        if self.ema_decay and self.optimizer == "adamw_schedulefree":
            raise ConfigError("train.ema_decay with train.optimizer=adamw_schedulefree: schedule-free already saves "
                              "its averaged weights (x); set train.ema_decay=0 or choose another optimizer")
        if self.report_to == "wandb":
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("train.report_to=wandb needs wandb: pip install wandb (or pip install "
                                  "'accord[wandb]'), or set train.report_to=tensorboard")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every={self.log_every} must be at least 1 (a console line every N steps)")


def _default_method() -> MethodOptions:
    from .methods.base import get_method

    return get_method(DEFAULT_METHOD).options()


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodOptions = field(default_factory=_default_method)
    accord: AccordConfig = field(default_factory=AccordConfig)
    regularizers: RegularizerConfig = field(default_factory=RegularizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        """Reject incompatible combinations (peft-style ``__post_init__`` checks, at the edge); the method's own
        checks are its options' :meth:`MethodOptions.validate`."""
        if not self.model.pretrained:
            raise ConfigError("model.pretrained is empty: give a hub id, a local diffusers folder or a "
                              ".safetensors file")
        if not self.data.instance_dir and not self.data.instance_dirs and self.method.reads_instance_dir():
            raise ConfigError("data.instance_dir is empty: give the folder of reference images")
        from .data.folders import check_data_config

        check_data_config(self)
        if not self.data.class_noun:
            raise ConfigError("data.class_noun is empty: give the superclass noun of the subject, e.g. 'backpack'")
        weights = (("accord.dd_weight", self.accord.dd_weight), ("accord.pd_weight", self.accord.pd_weight),
                   ("regularizers.sude_weight", self.regularizers.sude_weight),
                   ("regularizers.classdiffusion_weight", self.regularizers.classdiffusion_weight))
        for key, value in weights:
            if value < 0:
                raise ConfigError(f"{key}={value} is negative; use 0 to disable or a positive weight")
        if self.accord.grad_share_every < 0:
            raise ConfigError(f"accord.grad_share_every={self.accord.grad_share_every}: use 0 to disable or a positive "
                              "number of steps")
        if self.accord.dd_batch is not None and self.accord.dd_batch < 1:
            raise ConfigError(f"accord.dd_batch={self.accord.dd_batch}: use a positive number or null for the "
                              "whole batch")
        for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "resolution"):
            section = self.data if key == "resolution" else self.train
            if getattr(section, key) < 1:
                raise ConfigError(f"{'data' if key == 'resolution' else 'train'}.{key} must be at least 1")
        self.method.validate(self)
        d = self.data
        if d.mask_dir and not d.masked_loss:
            raise ConfigError(f"data.mask_dir={d.mask_dir} is set but data.masked_loss is off, so the masks would be "
                              "ignored; set data.masked_loss=true (or unset data.mask_dir)")
        if d.masked_loss and not self.method.supports_masked_loss:
            from .methods.base import methods_with

            raise ConfigError(f"data.masked_loss is for {', '.join(methods_with('supports_masked_loss'))}; "
                              f"{self.method.name} {self.method.no_masked_loss}: set it to false")
        if not (math.isfinite(d.unmasked_weight) and 0 <= d.unmasked_weight <= 1):
            raise ConfigError(f"data.unmasked_weight={d.unmasked_weight} must be in 0..1 (0: only the masked area "
                              "trains, 1: the mask has no effect)")
        if self.train.cache_latents and (self.data.random_flip or not self.data.center_crop):
            raise ConfigError("train.cache_latents needs fixed crops: set data.center_crop=true and "
                              "data.random_flip=false")
        from .quantize import check_quantize_config

        check_quantize_config(self)
        self.train.validate()
        return self


# ---------------------------------------------------------------------------- parsing

_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in _SECTIONS}


def _coerce(path: str, value: Any, f: dataclasses.Field, hint) -> Any:
    choices = f.metadata.get("choices")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path} cannot be null; give a {getattr(base, '__name__', base)}")
    try:
        if base is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                out = value.lower() in ("true", "yes", "1")
            else:
                raise ValueError
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        elif base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            out = os.path.expandvars(str(value))
            unresolved = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", out)
            if unresolved:
                raise ConfigError(f"{path}={value!r} uses environment variable ${unresolved[0]}, which is not set")
        elif base is list or typing.get_origin(base) is list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            out = [str(v) for v in value]
        else:  # pragma: no cover - every field type is listed above
            out = value
    except (TypeError, ValueError):
        raise ConfigError(f"{path}={value!r} is not a valid {getattr(base, '__name__', str(base))}") from None
    if choices is not None and out not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{path}={out!r} is not allowed; choose one of {allowed}")
    return out


# Keys that were replaced: (section, key) -> the one-line fix.
_RENAMED = {
    ("accord", "dd_reduction"): "accord.dd_reduction was replaced by accord.dd_scale (reference | mean | sum; default "
    "reference, the scale of the paper's weights); dd_reduction=mean is dd_scale=mean, ~500x weaker",
    ("accord", "dd_personal_grad"): "accord.dd_personal_grad was replaced by accord.dd_variant: dd_personal_grad=false "
    "is dd_variant=frozen_personal, true is dd_variant=paper",
}


def _unknown(path: str, key: str, allowed: list[str]) -> ConfigError:
    if (path, key) in _RENAMED:
        return ConfigError(_RENAMED[(path, key)])
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"{path}.{key}" if path else key
    return ConfigError(f"unknown config key {where!r}{hint}; allowed here: {', '.join(allowed)}")


def _method_section(raw: dict, other_methods: str) -> MethodOptions:
    """The ``method`` section as the options of the method it names. A key of another method is refused in one
    line (it would be ignored), except at that method's default value — the resolved configs saved before the
    options were split per method hold every method's key at its default — or with ``other_methods='drop'``."""
    from .methods.base import get_method, method_options

    known = method_options()
    name = raw.get("name", DEFAULT_METHOD)
    if not isinstance(name, str) or name not in known:  # the line of any key with choices
        raise ConfigError(f"method.name={name!r} is not allowed; choose one of {', '.join(map(repr, known))}")
    cls = get_method(name).options
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in raw.items():
        if key == "name":
            continue
        if key in fields:
            values[key] = _coerce(f"method.{key}", value, fields[key], hints[key])
            continue
        owners = [other for other, c in known.items() if any(f.name == key for f in dataclasses.fields(c))]
        if not owners:
            raise _unknown("method", key, list(fields))
        if other_methods == "drop" or _is_default(known[owners[0]], key, value):
            continue
        raise ConfigError(f"method.{key} is for {' / '.join(owners)}, not {name}; remove it or set "
                          f"method.name={owners[0]}")
    return cls(name=name, **values)


def _is_default(cls: type, key: str, value: Any) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    try:
        return _coerce(f"method.{key}", value, f, typing.get_type_hints(cls)[key]) == default
    except ConfigError:
        return False


def config_from_dict(data: dict | None, *, other_methods: str = "error") -> Config:
    """A :class:`Config` from a mapping of sections (not yet validated). ``other_methods='drop'`` ignores keys of
    methods other than ``method.name`` (for configs saved by older versions: checkpoints being resumed)."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(
            "the config file must be a mapping of sections (model, data, method, accord, regularizers, train)"
        )
    classes = _section_classes()
    sections = {}
    for key in data:
        if key not in classes:
            raise _unknown("", key, list(classes))
    for name, cls in classes.items():
        raw = data.get(name) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of keys, got {type(raw).__name__}")
        if name == "method":
            sections[name] = _method_section(raw, other_methods)
            continue
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in raw.items():
            if key not in fields:
                raise _unknown(name, key, list(fields))
            if (name, key) == ("data", "instance_dirs"):
                from .data.folders import parse_instance_dirs

                values[key] = parse_instance_dirs(value)
                continue
            if (name, key) == ("regularizers", "sude_truncation") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                raise ConfigError(f"regularizers.sude_truncation={value!r}: it now names the rule; for a fixed "
                                  f"threshold set regularizers.sude_truncation=fixed and regularizers.sude_tau={value}")
            values[key] = _coerce(f"{name}.{key}", value, fields[key], hints[key])
        sections[name] = cls(**values)
    return Config(**sections)


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config mapping."""
    data = dict(data or {})
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of keys, got {type(section).__name__}")
        data[name] = dict(section or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"--set {key!r}: name a key as section.key, e.g. accord.dd_weight=0.2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({getattr(exc, 'problem', None) or exc}); "
                              f"quote strings that hold YAML punctuation, e.g. "
                              f"--set '{key}=\"...\"' or, for a list, --set '{key}=[\"a {{trigger}}\"]'") from None
        data.setdefault(parts[0], {})[parts[1]] = value
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides, and return a validated :class:`Config`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; see examples/ for templates")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                              "save the file as UTF-8") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: the config must be a mapping of sections (model, data, method, accord, regularizers, train)"
            )
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data).validate()


def _describe_fields(cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    lines = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        extra = f" [{' | '.join(str(c) for c in choices)}]" if choices else ""
        lines.append(f"  {f.name}: {default!r}{extra}\n      {f.metadata.get('help', '')}")
    return lines


def describe_keys() -> str:
    """Every key with its default and meaning (for ``--help-config`` and the docs); the method keys per method."""
    from .methods.base import method_options

    lines = []
    for name, cls in _section_classes().items():
        if name != "method":
            lines += [f"{name}:", *_describe_fields(cls)]
            continue
        methods = method_options()
        help = next(f for f in dataclasses.fields(MethodOptions) if f.name == "name").metadata["help"]
        lines += ["method:", f"  name: {DEFAULT_METHOD!r} [{' | '.join(methods)}]\n      {help}"]
        for method, options in methods.items():
            lines += [f"method (name: {method}):", *_describe_fields(options, skip=("name",))]
    return "\n".join(lines)
