"""FLUX.1 (dev, schnell): ``FluxTransformer2DModel`` on packed latents, CLIP pooled + T5 sequence.

The loop and the losses see latents in the VAE's ``[B, C, H, W]`` layout; :meth:`FluxBackbone.predict`
packs them into 2×2 patches for the transformer and unpacks its velocity (``FluxPipeline``'s own
static helpers), so ``Parameterization`` and ``dd_loss`` work unchanged.
"""

from __future__ import annotations

import torch

from .base import Conditioning
from .flow import FlowBackbone
from .stable_diffusion import _eos_pooled, _tokenize

__all__ = ["FluxBackbone"]


class FluxBackbone(FlowBackbone):
    """A condition is CLIP's pooled output (``pooled_projections``) and T5's sequence
    (``encoder_hidden_states``). Text ids are all zeros in FLUX.1, so ``predict`` builds them from the
    sequence length instead of carrying them in :class:`Conditioning`.

    Guidance-distilled models (``transformer.config.guidance_embeds``, FLUX.1-dev) are fed ``guidance``
    during training (``model.flux_guidance``, default 1.0 as diffusers' train_dreambooth_lora_flux.py).
    """

    family = "flux"

    def __init__(self, pipe, source: str, guidance: float = 1.0):
        super().__init__(pipe, source)
        self.text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        self.guidance = float(guidance) if pipe.transformer.config.guidance_embeds else None
        # FluxPipeline's default; schnell (no guidance embedding) allows at most 256 T5 tokens.
        self.max_sequence_length = 512 if self.guidance is not None else 256

    def encode_prompts(self, prompts):
        prompts = self.prepare_prompts(prompts)
        clip = self.text_encoders[0](_tokenize(self.tokenizers[0], prompts, self.device), output_hidden_states=False)
        t5_ids = self.tokenizers[1](prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                                    return_tensors="pt").input_ids.to(self.device)
        return Conditioning(embeds=self.text_encoders[1](t5_ids)[0], pooled=clip.pooler_output)

    def predict(self, noisy, timesteps, cond):
        from diffusers import FluxPipeline

        self._check_size(noisy)
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None if self.guidance is None else torch.full((b,), self.guidance, device=noisy.device)
        out = self.denoiser(packed, timestep=timesteps / 1000, guidance=guidance,
                            pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds, txt_ids=txt_ids,
                            img_ids=img_ids, return_dict=False)[0]  # FluxPipeline feeds t/1000 = σ
        scale = self.latent_scale
        return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)

    def projected_text_features(self, prompts):
        """FLUX's CLIP is a ``CLIPTextModel`` without the projection: its pooled (end-of-text) output."""
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        ids = _tokenize(tokenizer, self.prepare_prompts(prompts), self.device)
        return _eos_pooled(encoder(ids).last_hidden_state, ids, tokenizer)
