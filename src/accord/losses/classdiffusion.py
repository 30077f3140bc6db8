"""Semantic Preservation Loss (SPL): Huang et al., "ClassDiffusion: More Aligned Personalization
Tuning with Explicit Class Guidance" (ICLR 2025), Sec. 4; the objective is ``L = L_recon + λ·L_sp``.

    L_sp = 1 − cos(f_p, f_c)

Fine-tuning drifts the personal concept away from its class in the text encoder's semantic space;
SPL pulls it back. Both features come from the same text encoder, pooled at the end-of-text token
(CLIP's text feature).

========================  ==========================================================================
paper                     name here
========================  ==========================================================================
phrase with the token     ``f_p`` ``[B, E]``: EOS feature of the personal phrase ("1 sks backpack")
phrase with class only    ``f_c`` ``[B, E]`` or ``[E]``: the same phrase with the class noun for
                          the trigger; detached here, so only the personal concept moves
``λ``                     ``regularizers.classdiffusion_weight`` (the trainer skips the work at 0)
========================  ==========================================================================

Unlike ACCORD's PDLoss (:mod:`accord.losses.pd`), which matches the personal concept's *relations*
to the caption's other concepts (``|cos(f_p, f_g) − cos(f_s, f_g)|``), SPL pulls the personal
feature itself onto the class feature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["classdiffusion_loss"]


def classdiffusion_loss(f_p: torch.Tensor, f_c: torch.Tensor):
    """Per-sample ``1 − cos(f_p, f_c)``, shaped ``[B]``, in float32 (float64 stays float64).

    Returns ``(per_sample, components)`` with detached ``classdiffusion`` and ``cos_pc`` ``[B]``.
    """
    dtype = torch.promote_types(f_p.dtype, torch.float32)
    f_p = f_p.to(dtype)
    f_c = f_c.detach().to(dtype).reshape(-1, f_p.shape[-1]).expand_as(f_p)
    cos = F.cosine_similarity(f_p, f_c, dim=-1)
    per_sample = 1 - cos
    return per_sample, {"classdiffusion": per_sample.detach(), "cos_pc": cos.detach()}
