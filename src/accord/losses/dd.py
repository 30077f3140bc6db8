"""Denoising Decouple Loss (DDLoss): Eqs. 7–8 of Liu et al., "ACCORD: Alleviating Concept Coupling
through Dependence Regularization for Text-to-Image Diffusion Personalization".

Paper symbol → name here:

=============================  ==============================================================
``U_θ(x_t, (c_p, c_g), t)``    posterior mean from ``joint`` (the full caption's prediction)
``U_θ(x_t, c_p, t)``           posterior mean from ``personal`` (the trigger phrase alone)
``U_θ(x_t, c_g, t)``           posterior mean from ``general`` (the caption without it)
``U_θ(x_t, ∅, t)``             posterior mean from ``null`` (the empty prompt)
``σ_t²``                       ``var``, the reverse-step variance ``σ̃²_t`` of the training grid
``t/T``                        ``weight`` (``σ_t`` for flow matching)
``x_t``                        ``sample``
=============================  ==============================================================

``U`` is the Gaussian posterior mean ``q(x_s | x_t, x̂_0)`` with the model's ``x̂_0`` plugged in; its
``x_t`` term is the same for every condition, so each difference ``U_j − U_c`` equals
``m_t·c_out·(prediction_j − prediction_c)`` (see :mod:`accord.losses.parameterization`).
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


def _shift(joint, personal, general, null, timesteps, scheduler):
    """Δ per sample and the grid coefficients it used (shared by both public functions)."""
    dtype = torch.promote_types(joint.dtype, torch.float32)
    c = Parameterization(scheduler).coefficients(_as_batch(timesteps, joint), dtype=dtype, device=joint.device)
    j = joint.to(dtype)
    u_scale = c.m * c.c_out  # U_j − U_c = m_t·c_out·(prediction_j − prediction_c); x_t terms cancel
    squared = _sq_norm(j - personal.to(dtype)) + _sq_norm(j - general.to(dtype)) - _sq_norm(j - null.to(dtype))
    delta = u_scale.pow(2) * squared / (2 * c.var)
    return torch.where(c.valid, delta, torch.zeros_like(delta)), c


def dependence_shift(joint, personal, general, null, *, sample, timesteps, scheduler) -> torch.Tensor:
    """Eq. 7: ``Δ = (‖U_j−U_p‖² + ‖U_j−U_g‖² − ‖U_j−U_∅‖²) / (2σ_t²)`` per sample, in nats.

    ``Δ`` estimates ``log r(c_p, c_g | x_{t−1}) − log r(c_p, c_g | x_t)``, the change of the
    conditional dependence coefficient (Eq. 3) over one reverse step to the previous point of the
    scheduler's training grid. The four predictions are in the scheduler's parameterization and
    shaped like ``sample`` (``[B, ...]``, x_t); ``timesteps`` are what the model was fed (``[B]`` or
    scalar). ``sample`` is accepted for the posterior formula's sake: its term is identical for all
    four conditions and cancels from every difference.

    Computed in float32 (float64 inputs stay float64). Where the grid has no previous step — DDPM/DDIM
    index 0, or flow matching's smallest training sigma, whose step lands on clean data with zero
    variance — the returned value is exactly 0: no reverse step, no dependence change counted
    (Eq. 8 weights index 0 by t/T = 0 anyway).
    """
    return _shift(joint, personal, general, null, timesteps, scheduler)[0]


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
    delta, c = _shift(joint, personal, general.detach(), null.detach(), timesteps, scheduler)
    scale = 1.0 / joint[0].numel() if reduction == "mean" else 1.0
    per_sample = c.weight * delta.abs() * scale
    components = {"dependence_shift": delta.detach(), "weight": c.weight.detach(), "dd": per_sample.detach()}
    return per_sample.mean(), components
