"""Subject-Derived regularization (SuDe): Qiao et al., "FaceChain-SuDe: Building Derived Class to
Inherit Category Attributes for One-shot Subject-Driven Generation" (CVPR 2024), Sec. 3.

The subject is a derived class of its category: a reverse step taken under the subject prompt should
still be classified as the category by the model's implicit classifier. With Bayes and the Gaussian
reverse steps ``p(x_{t−1} | x_t, c) = N(U(x_t, c, t), σ_t²)``, and ``x_{t−1}`` the subject step's mean,

    L_sude = −log p(c_cate | x_{t−1})
           = ( ‖U_sub − sg(U_cate)‖² − ‖U_sub − sg(U_∅)‖² ) / (2σ_t²)   (+ a constant, dropped)

which for ε-models is SuDe's ``β_t² / (2σ_t²·α_t·(1−ᾱ_t)) · (‖ε_sub − ε_cate‖² − ‖ε_sub − ε_∅‖²)``.
The ratio is unnormalised, so the loss has no floor (the subject step can be pushed ever further from
the unconditional one). SuDe's paper calls the remedy *loss truncation*; its official code
(modelscope/facechain, ``more_apps/Facechain-SuDe/ldm/models/diffusion/ddpm.py``, ``prob_loss_func_class``)
implements it as ``loss_delta = (loss − loss_refer > 0)``: a sample's term counts only while the subject's
value exceeds the same quantity computed for the category's own prediction,

    L_refer = ( ‖U_cate − U_cate‖² − ‖U_cate − U_∅‖² ) / (2σ_t²) = −‖U_cate − U_∅‖² / (2σ_t²),

i.e. while the subject step is classified as the category less surely than the category's own step.
That is ``truncation="category"``, the default. A fixed threshold in nats (``L = L_sude if L_sude > τ_L``)
is the option ``truncation=<float>``.

The official code then multiplies the per-element mean by ``1/posterior_mean_coef1[t]`` and by
``sude_weight`` (default 0.4), with no t/T factor: ``scale="reference"`` (:func:`accord.losses.dd.scale_factor`).
Departures, stated: the official code's ``.mean()`` of ``delta_c``/``delta`` runs over the batch as well as the
elements (equal for its batch of 1; here per sample), it adds 1e-6 to 2σ_t² (here exact: a relative difference
of 4.6e-4 at t = 50 on SD's schedule, 1.2e-3 at t = 1), and it is written for ε-prediction;
here the same Gaussian posterior means are formed for ε, v, x₀ and flow matching through
:mod:`accord.losses.parameterization`, with flow matching's ``m_t`` and ``σ̃_t²`` from its own training grid.

===================================  ==============================================================
paper                                name here
===================================  ==============================================================
``ε_θ(x_t, c_sub, t)``               ``subject``: the prediction under the subject caption (the
                                     trainer's joint prediction; gradient flows through it only)
``sg[ε_θ(x_t, c_cate, t)]``          ``category``: same caption with the class noun for the trigger
``sg[ε_θ(x_t, t)]``                  ``null``: the empty prompt
``U(x_t, c, t)``, ``σ_t²``           posterior mean and ``var`` from :mod:`accord.losses.parameterization`
``loss_delta`` (truncation)          ``truncation``: ``"category"`` (official) or a threshold in nats
===================================  ==============================================================

Same Gaussian machinery as ACCORD's Eq. 7 (:mod:`accord.losses.dd`), so it holds for every supported
parameterization; where the grid has no previous step (DDPM index 0, flow's smallest sigma) it is 0.
The trainer skips its two extra passes entirely when its weight is 0.
"""

from __future__ import annotations

import torch

from .dd import SCALES, _coefficients, _sq_norm, scale_factor

__all__ = ["sude_loss"]


def sude_loss(subject, category, null, *, timesteps, scheduler, truncation: str | float = "category",
              scale: str = "reference"):
    """Per-sample truncated ``−log p(c_cate | x_{t−1})`` (see the module docstring), shaped ``[B]``, on ``scale``.

    ``category`` and ``null`` are detached here (the paper's stop-gradient). ``truncation="category"`` keeps a
    sample's term where it exceeds the category prediction's own value (the official rule); a number keeps it
    where it exceeds that many nats. Returns ``(per_sample, components)``; the components are detached ``[B]``
    tensors: ``sude_nats`` (the untruncated loss in nats), ``sude_active`` (1 where not truncated) and ``sude``.
    """
    if scale not in SCALES:
        raise ValueError(f"sude_loss scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if truncation != "category" and isinstance(truncation, str):
        raise ValueError(f"sude_loss truncation must be 'category' or a number of nats, got {truncation!r}")
    c = _coefficients(subject, timesteps, scheduler)
    dtype = c.m.dtype
    s, cat, n = subject.to(dtype), category.detach().to(dtype), null.detach().to(dtype)
    k = (c.m * c.c_out).pow(2) / (2 * c.var)  # U_a − U_b = m_t·c_out·(pred_a − pred_b)
    nats = torch.where(c.valid, k * (_sq_norm(s - cat) - _sq_norm(s - n)), torch.zeros_like(k))
    if truncation == "category":
        threshold = torch.where(c.valid, -k * _sq_norm(cat - n), torch.zeros_like(k))  # L at subject = category
    else:
        threshold = torch.full_like(nats, float(truncation))
    active = c.valid & (nats > threshold)
    per_sample = torch.where(active, nats, torch.zeros_like(nats)) * scale_factor(c, subject[0].numel(), scale)
    components = {"sude_nats": nats.detach(), "sude_active": active.to(dtype), "sude": per_sample.detach()}
    return per_sample, components
