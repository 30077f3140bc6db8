"""Cross-attention mask loss: Avrahami et al., "Break-A-Scene: Extracting Multiple Concepts from a
Single Image" (SIGGRAPH Asia 2023), Sec. 3, ``L_attn``; the objective is ``L = L_masked_rec + λ_attn·L_attn``.

    L_attn = E_{i ∈ chosen} ‖ CA(v_i) / max CA(v_i) − M_i ‖²₂

Each chosen subject token ``v_i`` should attend to its own subject's pixels: its cross-attention map
(averaged over heads and the UNet layers of one resolution — 16×16 at 512 px in the paper) is
normalised by its maximum, as the authors' code does, and matched to the subject mask downsampled to
the map's size (mean squared error per map).

========================  ==========================================================================
paper                     name here
========================  ==========================================================================
``CA_θ(v_i, z_t)``        ``attention`` ``[B, S, h, w]``: map of subject slot ``s`` of sample ``b``
``M_i``                   ``masks`` ``[B, S, h, w]`` in ``[0, 1]``, at the maps' resolution
chosen subset             ``chosen`` ``[B, S]`` bool: the subjects named in the sample's prompt
``λ_attn``                ``method.bas_attn_weight`` (paper: 0.01; the trainer skips the capture at 0)
========================  ==========================================================================

Returns one value per sample — the sum over its chosen subjects' map MSEs, as the authors' code sums
over masks before averaging over the batch — plus ``{"per_subject": [B, S]}`` for logging.
"""

from __future__ import annotations

import torch

__all__ = ["cross_attention_mask_loss"]


def cross_attention_mask_loss(attention: torch.Tensor, masks: torch.Tensor, chosen: torch.Tensor,
                              eps: float = 1e-8) -> tuple[torch.Tensor, dict]:
    attention = attention.float()
    peak = attention.flatten(2).amax(-1).clamp_min(eps)[..., None, None]
    per_subject = (attention / peak - masks.float()).pow(2).flatten(2).mean(-1) * chosen.float()
    return per_subject.sum(-1), {"per_subject": per_subject.detach()}
