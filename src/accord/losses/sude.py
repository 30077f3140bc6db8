"""Subject-Derived regularization (SuDe): Qiao et al., "FaceChain-SuDe: Building Derived Class to
Inherit Category Attributes for One-shot Subject-Driven Generation" (CVPR 2024), Sec. 3.

The subject is a derived class of its category: a reverse step taken under the subject prompt should
still be classified as the category by the model's implicit classifier. With Bayes and the Gaussian
reverse steps ``p(x_{t−1} | x_t, c) = N(U(x_t, c, t), σ_t²)``, and ``x_{t−1}`` the subject step's mean,

    L_sude = −log p(c_cate | x_{t−1})
           = ( ‖U_sub − sg(U_cate)‖² − ‖U_sub − sg(U_∅)‖² ) / (2σ_t²)   (+ a constant, dropped)

which for ε-models is SuDe's ``β_t² / (2σ_t²·α_t·(1−ᾱ_t)) · (‖ε_sub − ε_cate‖² − ‖ε_sub − ε_∅‖²)``.
The ratio is unnormalised, so the loss has no floor (the subject step can be pushed ever further from
the unconditional one); the paper's *loss truncation* stops it once the category is likely enough:
``L = L_sude if L_sude > τ_L else 0`` per sample, with ``τ_L = −log τ`` for a probability threshold τ
(``τ_L = 0`` ⇔ τ = 1: a probability never exceeds 1).

===================================  ==============================================================
paper                                name here
===================================  ==============================================================
``ε_θ(x_t, c_sub, t)``               ``subject``: the prediction under the subject caption (the
                                     trainer's joint prediction; gradient flows through it only)
``sg[ε_θ(x_t, c_cate, t)]``          ``category``: same caption with the class noun for the trigger
``sg[ε_θ(x_t, t)]``                  ``null``: the empty prompt
``U(x_t, c, t)``, ``σ_t²``           posterior mean and ``var`` from :mod:`accord.losses.parameterization`
truncation threshold                 ``truncation`` (nats, on the loss before ``reduction``)
===================================  ==============================================================

Same Gaussian machinery as ACCORD's Eq. 7 (:mod:`accord.losses.dd`), so it holds for every supported
parameterization; where the grid has no previous step (DDPM index 0, flow's smallest sigma) it is 0.
The trainer skips its two extra passes entirely when its weight is 0.
"""

from __future__ import annotations

import torch

from .dd import _as_batch, _sq_norm
from .parameterization import Parameterization

__all__ = ["sude_loss"]


def sude_loss(subject, category, null, *, timesteps, scheduler, truncation: float = 0.0, reduction: str = "mean"):
    """Per-sample truncated ``−log p(c_cate | x_{t−1})`` (see the module docstring), shaped ``[B]``.

    ``category`` and ``null`` are detached here (the paper's stop-gradient). ``reduction="mean"``
    divides by the elements of one sample, the scale of ``accord.dd_reduction="mean"``; ``"sum"`` keeps
    nats. Returns ``(per_sample, components)``; the components are detached ``[B]`` tensors:
    ``sude_nats`` (the untruncated loss in nats), ``sude_active`` (1 where not truncated) and ``sude``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"sude_loss reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = torch.promote_types(subject.dtype, torch.float32)
    c = Parameterization(scheduler).coefficients(_as_batch(timesteps, subject), dtype=dtype, device=subject.device)
    s = subject.to(dtype)
    squared = _sq_norm(s - category.detach().to(dtype)) - _sq_norm(s - null.detach().to(dtype))
    nats = (c.m * c.c_out).pow(2) * squared / (2 * c.var)  # U_s − U_c = m_t·c_out·(pred_s − pred_c)
    nats = torch.where(c.valid, nats, torch.zeros_like(nats))
    active = c.valid & (nats > truncation)
    scale = 1.0 / subject[0].numel() if reduction == "mean" else 1.0
    per_sample = torch.where(active, nats, torch.zeros_like(nats)) * scale
    components = {"sude_nats": nats.detach(), "sude_active": active.to(dtype), "sude": per_sample.detach()}
    return per_sample, components
