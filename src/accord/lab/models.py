"""The lab's miniature models: architectures only (weights come from :mod:`accord.lab.pretrain`).

* ``mini_clip_text`` — a CLIP text tower (``CLIPTextModelWithProjection``, real CLIP tokenizer, 32 tokens);
  its weights double as the pipeline's ``text_encoder`` (a ``CLIPTextModel`` ignores the projection).
* :class:`ImageTower` — a small CNN whose projection lives in the same space (contrastive training).
* ``lab_vae`` / ``lab_unet`` — a tiny ``AutoencoderKL`` (32 px → 16×16×4) and ``UNet2DConditionModel``;
  :func:`grow_cross_attention` adds text cross-attention at its 16×16 level to a trained one.
* :class:`Detector` — per-attribute classifier heads over the world's label space.
"""

from __future__ import annotations

import torch
from torch import nn

from .world import BACKGROUNDS, COLORS, PATTERNS, PLACES, SHAPES

__all__ = ["TEXT_LEN", "EMBED", "mini_clip_text", "ImageTower", "lab_vae", "lab_unet", "grow_cross_attention",
           "lab_scheduler", "Detector"]

TEXT_LEN = 32  # tokens; the longest lab caption is ~25
EMBED = 32  # text width = cross-attention width = CLIP projection width


def text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, vocab_size=49408,
        hidden_size=EMBED, intermediate_size=4 * EMBED, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=TEXT_LEN, projection_dim=EMBED, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def mini_clip_text():
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(text_config())


def tokenizer():
    from ..testing.tiny import clip_tokenizer

    return clip_tokenizer(model_max_length=TEXT_LEN)


class ImageTower(nn.Module):
    """32 px RGB in [-1, 1] → an ``EMBED``-dim projection (not normalised)."""

    def __init__(self, width: int = 48, dim: int = EMBED):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.features = nn.Sequential(block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
                                      block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.projection = nn.Linear(8 * width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.features(x))


def lab_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64], layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=16, sample_size=32,
    )


def lab_unet():
    from diffusers import UNet2DConditionModel

    # 16x16 latents: plain ResNet blocks at 16x16, cross-attention at 8x8 and 4x4 (self-attention over
    # 256 positions would dominate the CPU step time).
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=EMBED,
        attention_head_dim=16, norm_num_groups=16,
    )


def grow_cross_attention(unet):
    """``unet`` (a :func:`lab_unet`) with cross-attention blocks added at its 16x16 level, where each latent pixel
    takes its colour: its top down block and up block become ``CrossAttn*`` blocks with ``only_cross_attention``
    (both attention layers read the text; self-attention over 256 positions would cost far more), their output
    projections zeroed, so the grown UNet predicts exactly what ``unet`` did until it is trained."""
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    if cfg["down_block_types"][0] != "DownBlock2D" or cfg["up_block_types"][-1] != "UpBlock2D":
        raise ValueError("grow_cross_attention: this UNet's 16x16 level already has attention (or it is not a lab "
                         "UNet); grow the unet-focus stage's UNet")
    cfg.update(down_block_types=["CrossAttnDownBlock2D", *cfg["down_block_types"][1:]],
               up_block_types=[*cfg["up_block_types"][:-1], "CrossAttnUpBlock2D"],
               only_cross_attention=[True] + [False] * (len(cfg["down_block_types"]) - 1),
               mid_block_only_cross_attention=False)
    grown = UNet2DConditionModel.from_config(cfg)
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or not all(".attentions." in k for k in missing):
        raise ValueError(f"grow_cross_attention: {type(unet).__name__} is not a lab UNet "
                         f"(unexpected {unexpected[:3]}, "
                         f"missing {[k for k in missing if '.attentions.' not in k][:3]})")
    for block in (grown.down_blocks[0], grown.up_blocks[-1]):
        for attn in block.attentions:
            torch.nn.init.zeros_(attn.proj_out.weight)
            torch.nn.init.zeros_(attn.proj_out.bias)
    return grown


def lab_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


HEADS = {"background": len(BACKGROUNDS)}
for _s in SHAPES:
    HEADS.update({f"{_s}.present": 2, f"{_s}.color": len(COLORS), f"{_s}.pattern": len(PATTERNS),
                  f"{_s}.place": len(PLACES)})


class Detector(nn.Module):
    """A CNN with one softmax head per attribute (``HEADS``); absent shapes' colour/pattern/place heads are ignored."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.tower = ImageTower(width, dim=256)
        self.heads = nn.ModuleDict({k.replace(".", "_"): nn.Linear(256, n) for k, n in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.tower(x))
        return {k: self.heads[k.replace(".", "_")](h) for k in HEADS}
