"""Denoising Decouple Loss (DDLoss): Eqs. 7–8 of Liu et al., "ACCORD: Alleviating Concept Coupling
through Dependence Regularization for Text-to-Image Diffusion Personalization".

``dependence_shift`` is Eq. 7 (its docstring maps the paper's symbols to names); ``dd_loss`` is Eq. 8;
``dependence_terms`` splits Eq. 7 into its three terms and into additivity against alignment.
"""

from __future__ import annotations

import torch

from .parameterization import Parameterization, PosteriorCoefficients

__all__ = ["SCALES", "dependence_shift", "dependence_terms", "dd_loss", "scale_factor"]

#: The loss scales ``dd_loss``/``sude_loss`` accept (``accord.dd_scale``); see :func:`scale_factor`.
SCALES = ("reference", "mean", "sum")


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).pow(2).sum(dim=1)


def _as_batch(timesteps, like: torch.Tensor) -> torch.Tensor:
    timesteps = torch.as_tensor(timesteps, device=like.device)
    return timesteps.expand(like.shape[0]) if timesteps.dim() == 0 else timesteps


def _coefficients(like: torch.Tensor, timesteps, scheduler) -> PosteriorCoefficients:
    dtype = torch.promote_types(like.dtype, torch.float32)
    return Parameterization(scheduler).coefficients(_as_batch(timesteps, like), dtype=dtype, device=like.device)


def scale_factor(c: PosteriorCoefficients, numel: int, scale: str) -> torch.Tensor:
    """Per-sample factor that puts a value in nats on ``scale``:

    - ``"reference"``: ``1 / (numel · m_t)``, Facechain-SuDe's official convention, which the paper follows
      (modelscope/facechain, ``more_apps/Facechain-SuDe/ldm/models/diffusion/ddpm.py``: ``prob_loss_func_class``
      takes the per-element mean of the squared posterior-mean differences over 2σ_t², and ``p_losses``
      multiplies it by ``1/posterior_mean_coef1[t]``). ``m_t`` is the posterior coefficient on ``x̂_0``
      (``posterior_mean_coef1`` for DDPM; the same Gaussian quantity for flow matching). On SD's schedule
      1/m_t runs from 45 (t = 50) to 1,208 (t = 999): for a Δ that does not change with t, under uniform t and
      Eq. 8's t/T, this scale is 513× ``mean``.
    - ``"mean"``: ``1 / numel``, nats per element;
    - ``"sum"``: 1, nats.

    Where the grid has no previous step (``m_t = 0``) the factor is 0; every value it scales is 0 there too.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    ones = torch.ones_like(c.m)
    if scale == "sum":
        return ones
    if scale == "mean":
        return ones / numel
    return torch.where(c.valid, 1.0 / (numel * torch.where(c.valid, c.m, ones)), torch.zeros_like(c.m))


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
    return _eq7(_coefficients(joint, timesteps, scheduler), joint, personal, general, null)["shift"]


def _eq7(c: PosteriorCoefficients, joint, personal, general, null, split: bool = False) -> dict[str, torch.Tensor]:
    """Eq. 7's three terms and Δ per sample in nats (``split``: also additivity and alignment)."""
    dtype = c.m.dtype
    j, p, g, n = (x.to(dtype) for x in (joint, personal, general, null))
    # U_a − U_b = m_t·c_out·(pred_a − pred_b); σ-normalised: u²/(2σ²)·‖pred_a − pred_b‖².
    k = (c.m * c.c_out).pow(2) / (2 * c.var)
    k = torch.where(c.valid, k, torch.zeros_like(k))
    personal_term, general_term, null_term = k * _sq_norm(j - p), k * _sq_norm(j - g), k * _sq_norm(j - n)
    out = {"personal": personal_term, "general": general_term, "null": null_term,
           "shift": personal_term + general_term - null_term}
    if split:
        dp, dg = p - n, g - n
        out["additivity"] = k * _sq_norm(j - n - dp - dg)
        out["alignment"] = 2 * k * (dp * dg).flatten(1).sum(1)
    return out


def dependence_terms(joint, personal, general, null, *, sample, timesteps, scheduler,
                     per_element: bool = True) -> dict[str, torch.Tensor]:
    """Eq. 7 apart, per sample, in nats per element (``per_element=False``: nats):

    - ``personal``, ``general``, ``null``: ``‖U_j − U_c‖² / (2σ_t²)`` for c = c_p, c_g, ∅, so that
      ``shift = personal + general − null`` is Δ;
    - ``additivity`` and ``alignment``: with displacements from the empty prediction, ``j = U_j − U_∅``,
      ``p = U_p − U_∅``, ``g = U_g − U_∅``, Eq. 7 is ``Δ·2σ_t² = ‖j − p − g‖² − 2⟨p, g⟩``; ``additivity`` is
      ``‖j − p − g‖²/(2σ_t²)`` (how far the joint step is from the sum of the single-concept steps) and
      ``alignment`` ``⟨p, g⟩/σ_t²`` (how much the two single-concept steps point the same way), so
      ``shift = additivity − alignment``. Driving |Δ| to 0 trades one against the other.

    Gradient flows through every input as given (detach what should be stop-gradient before calling).
    """
    terms = _eq7(_coefficients(joint, timesteps, scheduler), joint, personal, general, null, split=True)
    per = joint[0].numel() if per_element else 1
    return {name: value / per for name, value in terms.items()}


def dd_loss(joint, personal, general, null, *, sample, timesteps, scheduler, scale: str = "reference"):
    """Eq. 8 per sample: ``(t/T)·|Δ|``, on ``scale`` (:func:`scale_factor`), shaped ``[B]`` (the caller reduces).

    The default ``scale="reference"`` is the convention of the paper's weights (DD 0.1–0.3): Facechain-SuDe's
    official code, which ACCORD follows — Δ per element (the mean over one sample's elements), divided by the
    posterior coefficient ``m_t`` on ``x̂_0``. ``"mean"`` (Δ per element only) is ~500× weaker on SD's schedule,
    so the paper's weights do nothing there; ``"sum"`` keeps nats.

    ``general`` and ``null`` are detached here (the paper's stop-gradient, following Facechain-SuDe),
    so gradient reaches the model only through ``joint`` and ``personal``.

    Returns ``(per_sample, components)``; ``components`` holds detached per-sample tensors: ``dependence_shift`` (Δ in
    nats), ``weight`` (t/T), ``dd`` (the weighted per-sample term on ``scale``) and ``terms``
    (:func:`dependence_terms` in nats per element, from the same pass).
    """
    if scale not in SCALES:
        raise ValueError(f"dd_loss scale must be one of {', '.join(SCALES)}, got {scale!r}")
    c = _coefficients(joint, timesteps, scheduler)
    general, null = general.detach(), null.detach()
    delta = _eq7(c, joint, personal, general, null)["shift"]
    numel = joint[0].numel()
    per_sample = c.weight * delta.abs() * scale_factor(c, numel, scale)
    with torch.no_grad():  # for logging only: the split needs no gradient
        terms = {name: v / numel for name, v in _eq7(c, joint, personal, general, null, split=True).items()}
    components = {"dependence_shift": delta.detach(), "weight": c.weight.detach(), "dd": per_sample.detach(),
                  "terms": terms}
    return per_sample, components
