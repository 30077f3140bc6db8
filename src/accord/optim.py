"""Optimizers by name (``train.optimizer``) and per-kind learning rates, from the well-kept libraries.

=======================  ===========================================================  ==================
``train.optimizer``      class                                                         package
=======================  ===========================================================  ==================
``adamw``                ``torch.optim.AdamW``                                         torch
``adamw8bit``            ``bitsandbytes.optim.AdamW8bit``                              ``accord[bnb]``
``prodigy``              ``prodigyopt.Prodigy`` (Mishchenko & Defazio 2023)            ``accord[optim]``
``adafactor``            ``transformers.optimization.Adafactor`` (Shazeer & Stern 2018)  transformers
``adamw_schedulefree``   ``schedulefree.AdamWScheduleFree`` (Defazio et al. 2024)      ``accord[optim]``
=======================  ===========================================================  ==================

Schedule-free optimizers keep two points: the loop trains at ``y`` and evaluates/saves ``x``. They need
``optimizer.train()`` before training steps and ``optimizer.eval()`` before weights are read;
:func:`set_mode`, :func:`eval_weights` and :func:`eval_copy` do it (no-ops for every other optimizer). The
loop calls ``set_mode(training=True)`` once before its first step, wraps each checkpoint (on every
process) in ``eval_weights`` and the validation grid in ``eval_copy``, and ``set_mode(training=False)``
after the last step, before the final weights are checksummed and saved.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

__all__ = [
    "OPTIMIZERS", "make_optimizer", "lr_groups", "set_mode", "eval_weights", "eval_copy", "check_optimizer_config",
]

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "adamw_schedulefree")
_PACKAGES = {"adamw8bit": ("bitsandbytes", "bnb"), "prodigy": ("prodigyopt", "optim"),
             "adamw_schedulefree": ("schedulefree", "optim")}


def optimizer_name(t) -> str:
    """``train.optimizer``, with the older ``train.use_8bit_adam=true`` read as ``adamw8bit``."""
    return "adamw8bit" if t.use_8bit_adam and t.optimizer == "adamw" else t.optimizer


def check_optimizer_config(t) -> None:
    """Combinations the optimizers would reject with a traceback (called by ``TrainConfig.validate``)."""
    if t.use_8bit_adam and t.optimizer not in ("adamw", "adamw8bit"):
        raise ConfigError(f"train.use_8bit_adam=true conflicts with train.optimizer={t.optimizer}; unset "
                          "train.use_8bit_adam (it is train.optimizer=adamw8bit)")
    for key in ("text_encoder_lr", "embedding_lr"):
        value = getattr(t, key)
        if value is not None and not value > 0:
            raise ConfigError(f"train.{key}={value} must be a positive learning rate, or null for train.learning_rate")
    if t.optimizer == "adamw_schedulefree" and t.lr_scheduler != "constant":
        raise ConfigError(f"train.optimizer=adamw_schedulefree replaces the schedule: set train.lr_scheduler=constant "
                          f"(not {t.lr_scheduler}); its warm-up is train.lr_warmup_steps")
    if t.prodigy_d_coef <= 0:
        raise ConfigError(f"train.prodigy_d_coef={t.prodigy_d_coef} must be positive (1.0: Prodigy's default)")


def make_optimizer(config, param_groups):
    """The optimizer ``train.optimizer`` names, over ``param_groups`` (parameters or group dicts)."""
    t = config.train
    name = optimizer_name(t)
    if name in _PACKAGES:
        package, extra = _PACKAGES[name]
        try:
            module = __import__(package)
        except ImportError:
            raise ConfigError(f"train.optimizer={name} needs {package}: pip install 'accord[{extra}]'") from None
    betas = (t.adam_beta1, t.adam_beta2)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=t.learning_rate, betas=betas, weight_decay=t.weight_decay,
                                 eps=t.adam_epsilon)
    if name == "adamw8bit":
        return module.optim.AdamW8bit(param_groups, lr=t.learning_rate, betas=betas, weight_decay=t.weight_decay,
                                      eps=t.adam_epsilon)
    if name == "prodigy":  # lr is a multiplier of the estimated step size d: 1.0 is Prodigy's recommendation
        return module.Prodigy(param_groups, lr=t.learning_rate, betas=betas, weight_decay=t.weight_decay,
                              eps=t.adam_epsilon, d_coef=t.prodigy_d_coef, decouple=True,
                              use_bias_correction=t.prodigy_use_bias_correction,
                              safeguard_warmup=t.prodigy_safeguard_warmup)
    if name == "adafactor":  # a fixed learning rate (kohya's recommended Adafactor form: no relative step)
        from transformers.optimization import Adafactor

        return Adafactor(param_groups, lr=t.learning_rate, weight_decay=t.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    if name == "adamw_schedulefree":
        return module.AdamWScheduleFree(param_groups, lr=t.learning_rate, betas=betas, weight_decay=t.weight_decay,
                                        eps=t.adam_epsilon, warmup_steps=t.lr_warmup_steps)
    raise ConfigError(f"train.optimizer={name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")


def lr_groups(config, params: list, backbone) -> list:
    """``params`` split by kind when ``train.text_encoder_lr`` or ``train.embedding_lr`` is set: the learned
    token embeddings (textual inversion, custom diffusion, Break-A-Scene: each text encoder's input
    embedding) at ``embedding_lr``, the rest of the text encoders at ``text_encoder_lr``, the denoiser at
    ``train.learning_rate``. Neither set: ``params`` as they are (the optimizer state keeps its old layout)."""
    t = config.train
    if t.text_encoder_lr is None and t.embedding_lr is None:
        return params
    embeddings = {id(enc.get_input_embeddings().weight) for enc in backbone.text_encoders}
    text = {id(p) for enc in backbone.text_encoders for p in enc.parameters()}
    kinds = {"embedding": [], "text": [], "denoiser": []}
    for p in params:
        kinds["embedding" if id(p) in embeddings else "text" if id(p) in text else "denoiser"].append(p)
    rates = {"embedding": t.embedding_lr, "text": t.text_encoder_lr, "denoiser": None}
    return [{"params": ps, **({"lr": rates[k]} if rates[k] is not None else {})} for k, ps in kinds.items() if ps]


def set_mode(optimizer, training: bool) -> None:
    """A schedule-free optimizer's parameters to its training point ``y`` or evaluation point ``x`` (others:
    nothing). Each switch is one deterministic ``lerp`` with ``z``, so an uninterrupted run and one resumed
    from a checkpoint saved at ``x`` take the same values back to ``y``."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if _schedule_free(inner) and inner.param_groups[0]["train_mode"] != training:
        inner.train() if training else inner.eval()


@contextlib.contextmanager
def eval_weights(optimizer):
    """Inside: a schedule-free optimizer's parameters at ``x`` (checkpoints save them), then back at ``y`` by
    ``optimizer.train()``. Every process must enter it (the round trip is not bitwise the identity)."""
    set_mode(optimizer, training=False)
    try:
        yield
    finally:
        set_mode(optimizer, training=True)


@contextlib.contextmanager
def eval_copy(optimizer):
    """Inside: a schedule-free optimizer's parameters at ``x``; afterwards exactly the ``y`` they were (for work on
    one process only, such as the validation grid)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not _schedule_free(inner):
        yield
        return
    params = [p for g in inner.param_groups for p in g["params"]]
    kept = [p.detach().clone() for p in params]
    set_mode(inner, training=False)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, y in zip(params, kept):
                p.copy_(y)
        for g in inner.param_groups:
            g["train_mode"] = True


def _schedule_free(optimizer) -> bool:
    """schedulefree's optimizers mark their groups with ``train_mode``."""
    return any("train_mode" in g for g in optimizer.param_groups)
