"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel``, CLIP-L + CLIP-G + T5, flow matching.

A condition is encoded as ``StableDiffusion3Pipeline.encode_prompt`` does: the two CLIPs' penultimate
hidden states side by side, zero-padded to T5's width, then T5's sequence after them; the pooled
embedding is both CLIPs' projected outputs concatenated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Conditioning
from .flow import FlowBackbone
from .stable_diffusion import _eos_pooled, _tokenize, _unwrap

__all__ = ["StableDiffusion3Backbone"]


class StableDiffusion3Backbone(FlowBackbone):
    """``text_encoders``/``tokenizers`` hold CLIP-L, CLIP-G and T5 (T5 is absent when the pipeline was
    loaded with ``text_encoder_3=None``; its sequence is then zeros, as in the pipeline)."""

    family = "sd3"
    #: StableDiffusion3Pipeline's default T5 length
    max_sequence_length = 256

    def __init__(self, pipe, source: str):
        super().__init__(pipe, source)
        pairs = [(pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2),
                 (pipe.text_encoder_3, pipe.tokenizer_3)]
        self.text_encoders = [e for e, _ in pairs if e is not None]
        self.tokenizers = [t for e, t in pairs if e is not None]
        self._has_t5 = pipe.text_encoder_3 is not None
        self._joint_dim = pipe.transformer.config.joint_attention_dim
        self.patch = pipe.transformer.config.patch_size

    def encode_prompts(self, prompts):
        prompts = self.prepare_prompts(prompts)
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            out = encoder(_tokenize(tokenizer, prompts, self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        if self._has_t5:
            ids = self.tokenizers[2](prompts, padding="max_length", max_length=self.max_sequence_length,
                                     truncation=True, return_tensors="pt").input_ids.to(self.device)
            t5 = self.text_encoders[2](ids)[0]
        else:
            t5 = torch.zeros(
                len(prompts), self.max_sequence_length, self._joint_dim, device=self.device, dtype=clip.dtype
            )
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(embeds=torch.cat([clip, t5.to(clip.dtype)], dim=-2), pooled=torch.cat(pooled, dim=-1))

    def predict(self, noisy, timesteps, cond):
        self._check_size(noisy)
        return self.denoiser(noisy, timestep=timesteps, encoder_hidden_states=cond.embeds,
                             pooled_projections=cond.pooled, return_dict=False)[0]  # SD3 is fed σ·1000 as is

    def projected_text_features(self, prompts):
        """CLIP-G's end-of-text feature through its text projection (CLIP-G is the larger tower, as for SDXL)."""
        tokenizer, encoder = self.tokenizers[1], self.text_encoders[1]
        ids = _tokenize(tokenizer, self.prepare_prompts(prompts), self.device)
        return _unwrap(encoder).text_projection(_eos_pooled(encoder(ids).last_hidden_state, ids, tokenizer))
