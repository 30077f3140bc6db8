"""DDLoss variants: other per-step estimators of the goal ACCORD states in Eq. 4 (``accord.dd_variant``).

Eq. 4 asks that ``log r(c_p, c_g | x_0) ≈ log r(c_s, c_g)``: the subject depends on the other concepts of a
generated image as its superclass does a priori. Eq. 5 splits the gap at ``x_T``; Eq. 6 telescopes the denoising
part into per-step changes ``Δ_t`` (Eq. 7, :func:`accord.losses.dd.dependence_shift`), and Eq. 8 drives every
``|Δ_t|`` to 0. All variants below keep Eq. 8's ``t/T`` weight and :func:`accord.losses.dd.scale_factor`, so a
weight means the same strength on each.

Notation, per sample, in Eq. 7's units ``k = (m_t·c_out)² / (2σ_t²)`` and with displacements from the empty
prediction: ``J = U_j − U_∅``, ``P = U_p − U_∅``, ``G = U_g − U_∅`` (the predictions of the joint caption, the
trigger phrase, the rest of the caption, and the empty prompt). Then ``Δ = k·(‖J − P − G‖² − 2⟨P, G⟩)``.
An *anchor* is the same four predictions for the superclass through the base model (:meth:`Method.base_model`):
``J_s`` (the caption with the class noun for the trigger), ``S`` (the class-noun phrase), ``G_b``, ``∅_b``.

=================  =======================================================================================
variant            per-sample loss, and why it serves Eq. 4
=================  =======================================================================================
``paper``          ``(t/T)·|Δ_t(c_p)|`` (Eq. 8 as written). Its minimum asks no dependence change at any
                   step, but Eq. 4's target is the superclass's dependence, whose own steps do change
                   (``Δ_t(c_s) ≠ 0`` at the base). With gradient through ``P`` and ``Δ > 0``, descent
                   moves ``P`` towards ``J``: the trigger alone learns the whole scene.
``anchored``       ``(t/T)·|Δ_t(c_p) − sg Δ_t^base(c_s)|``. Summed over t (Eq. 6), the differences
                   telescope to ``[log r(c_p,c_g|x_0) − log r(c_p,c_g)] − [log r_base(c_s,c_g|x_0) −
                   log r(c_s,c_g)]``; with Eq. 5's prior term ② small (PDLoss), that is Eq. 4's gap with
                   the base model's superclass images as the reference. 0 at the base model for c_p = c_s.
``alignment``      ``(t/T)·2k·|⟨P, G⟩ − sg⟨S, G_b⟩|``. The only term of Δ that couples the single-concept
                   steps is ``−2k⟨P, G⟩``: how much the trigger alone already points where the rest of the
                   caption does. This matches it to how much the superclass does.
``composition``    ``(t/T)·k·‖J − P − G‖²``. ``∇_x log r(c_p, c_g | x_t) = ∇log p(x_t|c_p,c_g) −
                   ∇log p(x_t|c_p) − ∇log p(x_t|c_g) + ∇log p(x_t)``, proportional to ``J − P − G`` (for
                   ε-prediction ``∇log p(x_t|c) = −ε(x_t, c)/σ_t``, and ``U_a − U_b ∝ ε_a − ε_b``): driving
                   it to 0 makes the dependence
                   coefficient not vary with the image, i.e. the images carry no dependence that the
                   conditions do not. Its minimum has the joint step equal to the sum of the single-concept
                   steps, so a trigger that learned ``G`` is penalised (``J − P − G ≈ −G``).
``frozen_personal``  ``(t/T)·|Δ_t|`` with ``sg P``: Eq. 8 without the path that moves ``P`` to ``J``.
``conditional``    ``(t/T)·k·‖(U_j − U_p) − sg(U_js − U_s)‖²``. By Bayes, ``r(c, c_g | x) = p(c_g | x, c) /
                   p(c_g)``, so Eq. 4's gap at a noisy image is ``log r(c_p,c_g|x_t) − log r(c_s,c_g|x_t) =
                   log p(c_g|x_t,c_p) − log p(c_g|x_t,c_s)``. Its gradient in ``x_t`` is the difference of
                   the two conditional scores of ``c_g``: ``[∇log p(x_t|c_p,c_g) − ∇log p(x_t|c_p)] −
                   [∇log p(x_t|c_s,c_g) − ∇log p(x_t|c_s)] ∝ (ε_j − ε_p) − (ε_js − ε_s)``, the superclass side
                   through the base model. Zero everywhere makes the gap constant along the denoising path,
                   so with Eq. 5's prior term small (PDLoss) it is Eq. 4 itself. Unlike ``|Δ|``, a sum of
                   squares: no pair of terms can cancel, and it asks a whole vector (what the rest of the
                   caption changes in the image, given the subject), not one scalar, to match. A trigger
                   that learned part of ``c_g`` (a companion the captions name) makes ``U_j − U_p`` too
                   small where that part is, so the penalty pushes it out of ``U_p``.
=================  =======================================================================================

Gradient flows through ``joint`` and ``personal`` (``frozen_personal``: ``joint`` only); ``general``, ``null``
and the anchor are detached here.
"""

from __future__ import annotations

import torch

from .dd import _coefficients, _eq7, _sq_norm, dd_loss, scale_factor

__all__ = ["VARIANTS", "ANCHORED", "dd_variant_loss"]

VARIANTS = ("paper", "anchored", "alignment", "composition", "frozen_personal", "conditional")
#: the variants that read the superclass anchor
ANCHORED = ("anchored", "alignment", "conditional")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def dd_variant_loss(variant: str, joint, personal, general, null, *, sample, timesteps, scheduler,
                    scale: str = "reference", anchor: tuple | None = None):
    """Per-sample loss of ``variant`` (see the module docstring), shaped ``[B]``; ``anchor`` is
    ``(joint_s, superclass, general_b, null_b)`` for ``anchored``, ``alignment`` and ``conditional`` (which reads
    only the first two; the others may be None).

    Returns ``(per_sample, components)`` as :func:`accord.losses.dd.dd_loss` does (``dependence_shift``,
    ``weight``, ``dd``, ``terms``), plus ``anchor_shift`` (``Δ^base(c_s)`` in nats) for ``anchored`` and
    ``alignment``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"dd variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant in ANCHORED and anchor is None:
        raise ValueError(f"dd variant {variant!r} needs the superclass anchor (joint_s, superclass, general, null)")
    if variant == "frozen_personal":
        personal = personal.detach()
    per, comps = dd_loss(joint, personal, general, null, sample=sample, timesteps=timesteps, scheduler=scheduler,
                         scale=scale)
    if variant in ("paper", "frozen_personal"):
        return per, comps
    c = _coefficients(joint, timesteps, scheduler)
    dtype = c.m.dtype
    k = torch.where(c.valid, (c.m * c.c_out).pow(2) / (2 * c.var), torch.zeros_like(c.m))
    factor = c.weight * scale_factor(c, joint[0].numel(), scale)
    j, p, g, n = (x.to(dtype) for x in (joint, personal, general.detach(), null.detach()))
    big_j, big_p, big_g = j - n, p - n, g - n
    if variant == "composition":
        value = k * _sq_norm(big_j - big_p - big_g)
    else:
        js, s, gb, nb = (None if x is None else x.detach().to(dtype) for x in anchor)
        if variant == "conditional":  # reads U_js − U_s only (the trainer passes no general/null anchor)
            value = k * _sq_norm((j - p) - (js - s))
        elif variant == "anchored":
            base = _eq7(c, js, s, gb, nb)["shift"]
            comps["anchor_shift"] = base
            value = (_eq7(c, j, p, g, n)["shift"] - base).abs()
        else:  # alignment
            comps["anchor_shift"] = _eq7(c, js, s, gb, nb)["shift"]
            value = 2 * k * (_dot(big_p, big_g) - _dot(s - nb, gb - nb)).abs()
    per = factor * value
    comps["dd"] = per.detach()
    return per, comps
