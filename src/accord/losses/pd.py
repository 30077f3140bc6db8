"""Prior Decouple Loss (PDLoss): Eq. 11 of Liu et al., "ACCORD".

``L_PD = E_{c_g} |cos(f_p, f_g) − cos(f_s, f_g)|`` in CLIP's projection space.

===========  =====================================================================
paper        name here
===========  =====================================================================
``f_p``      ``f_p`` ``[B, E]``: the personal concept (prompt with the learned token, or
             the projected image embedding of an image-encoder method)
``f_s``      ``f_s`` ``[B, E]`` or ``[E]``: the superclass ("backpack")
``f_g``      ``f_g`` ``[B, G, E]``: the other concepts of each sample's caption
``E_{c_g}``  mean over each sample's valid general concepts (``mask`` ``[B, G]``)
===========  =====================================================================

Only ``f_p`` is pulled: ``f_s`` and ``f_g`` are detached here, so PDLoss moves the personal
concept towards its superclass's relations and never the other way round.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pd_loss", "text_features", "image_features"]


def pd_loss(f_p: torch.Tensor, f_s: torch.Tensor, f_g: torch.Tensor, *, mask: torch.Tensor | None = None):
    """Eq. 11 per sample, averaged over each sample's general concepts, shaped ``[B]`` (the caller reduces).

    A sample with no valid general concept contributes 0. Returns ``(per_sample, components)`` with detached
    per-sample ``pd`` and the mean cosines ``cos_pg`` and ``cos_sg``.
    """
    if f_g.dim() != 3:
        raise ValueError(f"pd_loss expects f_g shaped [B, G, E], got {tuple(f_g.shape)}")
    dtype = torch.promote_types(f_p.dtype, torch.float32)
    batch = f_g.shape[0]
    f_p = f_p.to(dtype).reshape(batch, 1, -1)
    f_s = f_s.detach().to(dtype).reshape(-1, 1, f_g.shape[-1]).expand(batch, 1, -1)
    f_g = f_g.detach().to(dtype)
    cos_pg = F.cosine_similarity(f_p, f_g, dim=-1)  # [B, G]
    cos_sg = F.cosine_similarity(f_s, f_g, dim=-1)
    if mask is None:
        mask = torch.ones(cos_pg.shape, dtype=torch.bool, device=cos_pg.device)
    mask = mask.to(device=cos_pg.device, dtype=torch.bool)
    weights = mask.to(dtype)
    count = weights.sum(dim=1)
    denominator = count.clamp_min(1)
    per_sample = ((cos_pg - cos_sg).abs() * weights).sum(dim=1) / denominator
    components = {
        "pd": per_sample.detach(),
        "cos_pg": ((cos_pg * weights).sum(dim=1) / denominator).detach(),
        "cos_sg": ((cos_sg * weights).sum(dim=1) / denominator).detach(),
    }
    return per_sample, components


def text_features(text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Projected text embeddings (``text_embeds``) of a ``CLIPTextModelWithProjection``, ``[N, E]``.

    Gradient flows through the encoder, so a learned token's embedding row receives it.
    """
    out = text_encoder(input_ids=input_ids, attention_mask=attention_mask)
    embeds = getattr(out, "text_embeds", None)
    if embeds is None:
        raise TypeError(
            f"{type(text_encoder).__name__} returns no text_embeds; PDLoss needs a CLIPTextModelWithProjection "
            "(set accord.pd_clip to a CLIP model with a text projection)"
        )
    return embeds


def image_features(vision_encoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings (``image_embeds``) of a ``CLIPVisionModelWithProjection``, ``[N, E]``."""
    out = vision_encoder(pixel_values=pixel_values)
    embeds = getattr(out, "image_embeds", None)
    if embeds is None:
        raise TypeError(f"{type(vision_encoder).__name__} returns no image_embeds; use a CLIPVisionModelWithProjection")
    return embeds
