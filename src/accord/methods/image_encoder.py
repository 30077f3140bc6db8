"""The frozen CLIP image encoder that image-encoder methods (visual_encoder, ip_adapter) share.

Reference pixels arrive as the dataset yields them (``[-1, 1]``, the training resolution); they are
resized to the encoder's input size and normalised with CLIP's mean and std, so training and
inference feed the encoder the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import MethodOptions, _f
from ..errors import ConfigError

__all__ = ["ImageEncoderOptions", "load_image_encoder", "clip_pixels", "image_embeddings", "pil_to_pixels"]


@dataclass
class ImageEncoderOptions(MethodOptions):
    """Options of the methods conditioned on the reference image (visual_encoder, ip_adapter)."""

    image_encoder: str = _f(
        "", "a CLIPVisionModelWithProjection (hub id or folder), e.g. 'openai/clip-vit-large-patch14' or "
        "'h94/IP-Adapter' with image_encoder_subfolder 'models/image_encoder'"
    )
    image_encoder_subfolder: str | None = _f(None, "subfolder of image_encoder")

    def validate(self, config) -> None:
        super().validate(config)
        if not self.image_encoder:
            raise ConfigError(f"method.image_encoder is empty: {self.name} needs a CLIPVisionModelWithProjection, "
                              "e.g. 'openai/clip-vit-large-patch14'")
        if config.data.with_prior_preservation:
            raise ConfigError(f"data.with_prior_preservation: {self.name} has no image condition for class "
                              "images; set it to false")

#: OpenAI CLIP's normalisation (CLIPImageProcessor's defaults)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image_encoder(source: str, subfolder: str | None = None):
    """A frozen ``CLIPVisionModelWithProjection`` from a hub id or folder (one-line error offline)."""
    from transformers import CLIPVisionModelWithProjection

    from ..backbones import _offline_hint
    from ..errors import ModelLoadError

    try:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        encoder = CLIPVisionModelWithProjection.from_pretrained(source, **kwargs)
    except Exception:
        raise ModelLoadError(f"method.image_encoder: {_offline_hint(source)}") from None
    return encoder.requires_grad_(False).eval()


def clip_pixels(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    """``[-1, 1]`` images ``[B, 3, H, W]`` → CLIP input: resized to ``size`` (bicubic) and normalised."""
    x = (pixel_values.float() + 1) / 2
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def image_embeddings(encoder, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP's projected image embeddings (``image_embeds``) ``[B, E]`` of ``[-1, 1]`` images, no gradient."""
    device = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    pixels = clip_pixels(pixel_values.to(device), encoder.config.image_size).to(dtype)
    return encoder(pixel_values=pixels).image_embeds.float()


def pil_to_pixels(image) -> torch.Tensor:
    """A PIL image (or a path) → ``[1, 3, H, W]`` in ``[-1, 1]`` (what the dataset yields)."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.open(image)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]
