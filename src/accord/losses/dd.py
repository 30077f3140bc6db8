"""Denoising Decouple Loss (DDLoss): Eqs. 7–8 of Liu et al., "ACCORD: Alleviating Concept Coupling
through Dependence Regularization for Text-to-Image Diffusion Personalization".

``dependence_shift`` is Eq. 7 (its docstring maps the paper's symbols to names); ``dd_loss`` is Eq. 8.
"""

from __future__ import annotations

import torch

from .parameterization import Parameterization

__all__ = ["dependence_shift", "dd_loss"]


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).pow(2).sum(dim=1)


def _as_batch(timesteps, like: torch.Tensor) -> torch.Tensor:
    timesteps = torch.as_tensor(timesteps, device=like.device)
    return timesteps.expand(like.shape[0]) if timesteps.dim() == 0 else timesteps


def dependence_shift(joint, personal, general, null, *, sample, timesteps, scheduler) -> torch.Tensor:
    """Eq. 7: ``Δ = (‖U_j−U_p‖² + ‖U_j−U_g‖² − ‖U_j−U_∅‖²) / (2σ_t²)`` per sample, in nats.

    =============================  ===========================================================
    paper                          here
    =============================  ===========================================================
    ``U_θ(x_t, (c_p, c_g), t)``    posterior mean from ``joint`` (the full caption's prediction)
    ``U_θ(x_t, c_p, t)``           posterior mean from ``personal`` (the trigger phrase alone)
    ``U_θ(x_t, c_g, t)``           posterior mean from ``general`` (the caption without it)
    ``U_θ(x_t, ∅, t)``             posterior mean from ``null`` (the empty prompt)
    ``σ_t²``                       ``c.var``: the reverse-step variance σ̃²_t of the training grid
    ``x_t``, ``t``                 ``sample``, ``timesteps`` (as fed to the model)
    =============================  ===========================================================

    ``U`` is the Gaussian posterior mean of ``q(x_s | x_t, x̂_0)`` (DESIGN.md) with the model's ``x̂_0``
    plugged in. Its ``x_t`` term is the same for all four conditions, so ``U_j − U_c =
    m_t·c_out·(prediction_j − prediction_c)`` exactly (:mod:`accord.losses.parameterization`); the
    predictions are in the scheduler's parameterization, shaped ``[B, ...]`` like ``sample``.

    Δ estimates ``log r(c_p, c_g | x_{t−1}) − log r(c_p, c_g | x_t)`` (Eq. 3's dependence coefficient)
    over one reverse step to the previous point of the training grid. Computed in float32 (float64
    inputs stay float64). Where the grid has no previous step — DDPM/DDIM index 0, or flow matching's
    smallest sigma, whose step lands on clean data with zero variance — Δ is exactly 0: no reverse
    step, no dependence change counted (Eq. 8 weights index 0 by t/T = 0 anyway).
    """
    dtype = torch.promote_types(joint.dtype, torch.float32)
    c = Parameterization(scheduler).coefficients(_as_batch(timesteps, joint), dtype=dtype, device=joint.device)
    j = joint.to(dtype)
    u_scale = c.m * c.c_out  # U_j − U_c = u_scale·(prediction_j − prediction_c)
    squared = _sq_norm(j - personal.to(dtype)) + _sq_norm(j - general.to(dtype)) - _sq_norm(j - null.to(dtype))
    delta = u_scale.pow(2) * squared / (2 * c.var)
    return torch.where(c.valid, delta, torch.zeros_like(delta))


def dd_loss(joint, personal, general, null, *, sample, timesteps, scheduler, reduction: str = "mean"):
    """Eq. 8: the batch mean of ``(t/T)·|Δ|``.

    ``general`` and ``null`` are detached here (the paper's stop-gradient, following Facechain-SuDe),
    so gradient reaches the model only through ``joint`` and ``personal``.

    ``reduction="mean"`` divides Δ by the number of elements of one sample, the per-element scale on
    which the paper's weights of 0.1–0.3 are plausible; ``"sum"`` keeps nats.

    Returns ``(loss, components)``; ``components`` holds detached per-sample tensors:
    ``dependence_shift`` (Δ in nats), ``weight`` (t/T) and ``dd`` (the weighted per-sample term).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"dd_loss reduction must be 'mean' or 'sum', got {reduction!r}")
    delta = dependence_shift(joint, personal, general.detach(), null.detach(), sample=sample, timesteps=timesteps,
                             scheduler=scheduler)
    weight = Parameterization(scheduler).coefficients(_as_batch(timesteps, joint), dtype=delta.dtype,
                                                      device=delta.device).weight
    scale = 1.0 / joint[0].numel() if reduction == "mean" else 1.0
    per_sample = weight * delta.abs() * scale
    components = {"dependence_shift": delta.detach(), "weight": weight.detach(), "dd": per_sample.detach()}
    return per_sample.mean(), components
