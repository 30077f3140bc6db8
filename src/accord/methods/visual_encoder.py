"""VisualEncoder (paper Appendix N; Ye et al., 2023 without the image cross-attention).

A frozen CLIP image encoder (``method.image_encoder``) embeds the reference; a trainable MLP maps the
projected embedding ``[B, E]`` to ``method.image_tokens`` tokens in the UNet's text-token space, which
join the text tokens. Only the MLP is trained (per subject, test-time); at inference it embeds any
new reference. For SD 1.5 with ViT-L/14 (E = D = 768, 4 tokens) it has 2.95 M parameters (paper
Tab. 1: 3.0 M).

ACCORD's conditions (c_p is the image tokens):

=========  ==========================================================
joint      caption text tokens + image tokens
personal   the trigger phrase's text tokens + image tokens
general    the caption without c_p, no image tokens
empty      the empty prompt, no image tokens
=========  ==========================================================

PDLoss (Eq. 11) needs ``f_p`` in CLIP's joint space with gradient into what is trained. The image
tokens live where the text encoder's final hidden states live, whose end-of-text feature CLIP's text
projection maps into the joint space; so ``f_p`` = that projection of the mean image token
(``Backbone.projected_token_features``), compared with the superclass phrase and the other concepts
through the same projection. (The reference's raw CLIP image embedding would be constant: no gradient.)

Output: ``visual_encoder.safetensors`` (the MLP's ``state_dict``) and ``visual_encoder.json`` (its
sizes and the image encoder). Use::

    from accord.methods.visual_encoder import VisualEncoder, generate_with_reference
    VisualEncoder.load_into(pipe, "OUT")          # pipe: the base model's stock pipeline
    image = generate_with_reference(pipe, "ref.jpg", "a sks backpack on a beach").images[0]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import _f
from .base import Method, register
from .image_encoder import ImageEncoderOptions, image_embeddings, load_image_encoder, pil_to_pixels

__all__ = ["VisualEncoder", "VisualProjection", "VisualEncoderAdapter", "generate_with_reference"]

VE_FILE = "visual_encoder.safetensors"
VE_CONFIG = "visual_encoder.json"


class VisualProjection(torch.nn.Module):
    """CLIP image embedding ``[B, E]`` → ``[B, N, D]`` tokens: Linear(E, E), GELU, Linear(E, N·D), LayerNorm(D)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4):
        super().__init__()
        self.num_tokens, self.cross_attention_dim = num_tokens, cross_attention_dim
        self.mlp = torch.nn.Sequential(torch.nn.Linear(image_embed_dim, image_embed_dim), torch.nn.GELU(),
                                       torch.nn.Linear(image_embed_dim, num_tokens * cross_attention_dim))
        self.norm = torch.nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.mlp(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


@dataclasses.dataclass
class VisualEncoderOptions(ImageEncoderOptions):
    supports_masked_loss = True

    image_tokens: int = _f(4, "image tokens the MLP adds to the text tokens")


@register
class VisualEncoder(Method):
    name = "visual_encoder"
    options = VisualEncoderOptions
    output_file = VE_FILE
    learns_personal_embedding = True  # c_p (the image tokens) is trained: PDLoss applies

    def setup(self) -> None:
        super().setup()
        m = self.config.method
        self.encoder = load_image_encoder(m.image_encoder, m.image_encoder_subfolder)
        unet = self.backbone.denoiser
        self.mlp = VisualProjection(self.encoder.config.projection_dim, unet.config.cross_attention_dim, m.image_tokens)
        self.mlp.to(self.backbone.device)
        self._mlp = self.mlp  # accelerate's wrapper after rebind

    def trainable_modules(self):
        return [self.mlp]

    def rebind(self, prepared):
        self._mlp = prepared[0]

    def reference_condition(self, batch):
        device = self.backbone.device
        self.encoder.to(device)
        return self._mlp(image_embeddings(self.encoder, batch["pixel_values"]).to(device))

    def attach(self, cond, image):
        if image is None:
            return cond
        return dataclasses.replace(cond, embeds=torch.cat([cond.embeds, image.to(cond.embeds.dtype)], dim=1))

    def personal_features(self, image):
        return self.backbone.projected_token_features(image)

    def write_weights(self, output_dir: Path) -> list[Path]:
        from safetensors.torch import save_file

        output_dir = Path(output_dir)
        mlp = self.unwrapped_modules()[0]
        weights = output_dir / VE_FILE
        save_file({k: v.detach().float().cpu().contiguous() for k, v in mlp.state_dict().items()}, str(weights))
        m = self.config.method
        info = {"image_encoder": m.image_encoder, "image_encoder_subfolder": m.image_encoder_subfolder,
                "image_embed_dim": self.encoder.config.projection_dim, "cross_attention_dim": mlp.cross_attention_dim,
                "num_tokens": mlp.num_tokens, "family": self.backbone.family}
        (output_dir / VE_CONFIG).write_text(json.dumps(info, indent=2))
        return [weights, output_dir / VE_CONFIG]

    def readme_notes(self) -> list[str]:
        return [f"- `{VE_FILE}` + `{VE_CONFIG}`: the MLP and its image encoder; no stock loader takes it: "
                "`accord.inference.load_trained` (above), or a stock pipeline's `prompt_embeds` as in accord's "
                "docs/image-encoders.md"]

    @staticmethod
    def load_into(pipeline, output_dir: Path, image_encoder=None) -> None:
        """Attach the trained MLP (and its image encoder, or ``image_encoder`` when given) to ``pipeline`` as
        ``pipeline.accord_visual_encoder``; generate with :func:`generate_with_reference`."""
        pipeline.accord_visual_encoder = VisualEncoderAdapter.from_folder(output_dir, image_encoder=image_encoder)

    @staticmethod
    def unload_from(pipeline) -> bool:
        if hasattr(pipeline, "accord_visual_encoder"):
            del pipeline.accord_visual_encoder
        return True


class VisualEncoderAdapter:
    """The trained MLP with its frozen image encoder, for inference on any reference image."""

    def __init__(self, encoder, mlp: VisualProjection):
        self.encoder, self.mlp = encoder, mlp

    @classmethod
    def from_folder(cls, folder, image_encoder=None) -> VisualEncoderAdapter:
        from safetensors.torch import load_file

        from ..errors import ModelLoadError

        folder = Path(folder)
        if not (folder / VE_CONFIG).is_file() or not (folder / VE_FILE).is_file():
            raise ModelLoadError(f"{folder}: no {VE_FILE} + {VE_CONFIG}; point at a visual_encoder run's output folder")
        info = json.loads((folder / VE_CONFIG).read_text())
        encoder = image_encoder or load_image_encoder(info["image_encoder"], info.get("image_encoder_subfolder"))
        mlp = VisualProjection(info["image_embed_dim"], info["cross_attention_dim"], info["num_tokens"])
        mlp.load_state_dict(load_file(str(folder / VE_FILE)))
        return cls(encoder.requires_grad_(False).eval(), mlp.requires_grad_(False).eval())

    @torch.no_grad()
    def tokens(self, reference, device=None, dtype=None) -> torch.Tensor:
        """``[1, N, D]`` image tokens of a PIL image / path (or a ``[B, 3, H, W]`` tensor in ``[-1, 1]``)."""
        pixels = reference if isinstance(reference, torch.Tensor) else pil_to_pixels(reference)
        self.encoder.to(device)
        self.mlp.to(device)
        return self.mlp(image_embeddings(self.encoder, pixels).to(device)).to(dtype)


@torch.no_grad()
def generate_with_reference(pipeline, reference, prompt: str, negative_prompt: str = "", **kwargs):
    """Generate ``prompt`` with the reference's image tokens joined to its text tokens (the joint condition).

    The negative (unconditional) side is the text alone, as in training's empty condition; it is padded to the
    same length with copies of its last (padding) token, since the pipeline needs equal lengths.
    """
    from ..errors import ConfigError

    adapter = getattr(pipeline, "accord_visual_encoder", None)
    if adapter is None:
        raise ConfigError("pipeline has no visual encoder: call VisualEncoder.load_into(pipeline, OUTPUT_DIR) first")
    device, dtype = pipeline.unet.device, pipeline.unet.dtype
    image = adapter.tokens(reference, device, dtype)
    xl = hasattr(pipeline, "text_encoder_2")
    if xl:
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative_prompt)
        kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
    else:
        embeds, negative = pipeline.encode_prompt(prompt, device, 1, True, negative_prompt=negative_prompt)
    n = image.shape[1]
    embeds = torch.cat([embeds, image.expand(embeds.shape[0], -1, -1)], dim=1)
    negative = torch.cat([negative, negative[:, -1:].repeat(1, n, 1)], dim=1)
    return pipeline(prompt_embeds=embeds, negative_prompt_embeds=negative, **kwargs)
