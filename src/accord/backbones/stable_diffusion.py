"""Stable Diffusion 1.x/2.x and SDXL backbones (UNet2DConditionModel + AutoencoderKL + CLIP)."""

from __future__ import annotations

import torch

from ..losses import Parameterization
from .base import Backbone, Conditioning

__all__ = ["StableDiffusionBackbone", "StableDiffusionXLBackbone"]


def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def _eos_pooled(hidden: torch.Tensor, ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """The final hidden state at each prompt's first end-of-text token (CLIP's pooled feature).

    transformers' ``pooler_output`` takes ``argmax(input_ids)`` when a config says ``eos_token_id=2``
    (SD 1.x and SDXL ship such configs), which lands on an added token (id > 49407) once textual
    inversion has grown the vocabulary; PDLoss needs the true end-of-text feature.
    """
    first_eos = (ids == tokenizer.eos_token_id).int().argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first_eos]


def _image_kwargs(cond) -> dict | None:
    """IP-Adapter's image embeddings as the UNet's ``added_cond_kwargs`` (a list: one entry per adapter)."""
    return None if cond.image_embeds is None else {"image_embeds": [cond.image_embeds]}


def _unwrap(module):
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module)


class _UNetBackbone(Backbone):
    def __init__(self, pipe, noise_scheduler, source: str):
        self.source = source
        self.pipeline_class = type(pipe)
        self.denoiser = pipe.unet
        self.vae = pipe.vae
        self.noise_scheduler = noise_scheduler
        self.parameterization = Parameterization(noise_scheduler)
        self._pipe = pipe

    def _ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return _tokenize(tokenizer, self.prepare_prompts(prompts), self.device)




class StableDiffusionBackbone(_UNetBackbone):
    """SD 1.x / 2.x: one CLIP text encoder; conditions are its last hidden states."""

    family = "sd"

    def __init__(self, pipe, noise_scheduler, source: str, pd_projection: torch.nn.Module | None = None):
        super().__init__(pipe, noise_scheduler, source)
        self.text_encoders = [pipe.text_encoder]
        self.tokenizers = [pipe.tokenizer]
        self.pd_projection = pd_projection

    def encode_prompts(self, prompts):
        ids = self._ids(self.tokenizers[0], prompts)
        return Conditioning(embeds=self.text_encoders[0](ids)[0])

    def predict(self, noisy, timesteps, cond):
        return self.denoiser(noisy, timesteps, encoder_hidden_states=cond.embeds, added_cond_kwargs=_image_kwargs(cond),
                             return_dict=False)[0]

    def projected_text_features(self, prompts):
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        ids = self._ids(tokenizer, prompts)
        pooled = _eos_pooled(encoder(ids).last_hidden_state, ids, tokenizer)
        # SD's text tower is CLIP's; its projection is not shipped with SD, so take it from accord.pd_clip.
        return self._project(pooled)

    def _project(self, pooled):
        return pooled if self.pd_projection is None else self.pd_projection(pooled.to(self.pd_projection.weight.dtype))

    def projected_token_features(self, tokens):
        # The UNet's tokens are CLIP's final (layer-normed) hidden states, the space of the EOS feature that
        # projected_text_features projects: pool the tokens and apply the same projection.
        return self._project(tokens.mean(dim=1))


class StableDiffusionXLBackbone(_UNetBackbone):
    """SDXL: two CLIP encoders (penultimate layers concatenated), pooled embeddings and time ids per condition."""

    family = "sdxl"

    def __init__(self, pipe, noise_scheduler, source: str, resolution: int = 1024):
        super().__init__(pipe, noise_scheduler, source)
        self.text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        self.resolution = resolution

    def _time_ids(self, n: int, dtype) -> torch.Tensor:
        # original size, crop top-left, target size: square training crops at the training resolution.
        r = self.resolution
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=dtype, device=self.device).repeat(n, 1)

    def encode_prompts(self, prompts):
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = self._ids(tokenizer, prompts)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        embeds = torch.cat(hidden, dim=-1)
        return Conditioning(embeds=embeds, pooled=pooled, time_ids=self._time_ids(len(prompts), embeds.dtype))

    def predict(self, noisy, timesteps, cond):
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids, **(_image_kwargs(cond) or {})}
        return self.denoiser(
            noisy, timesteps, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False
        )[0]

    def projected_text_features(self, prompts):
        tokenizer, encoder = self.tokenizers[1], self.text_encoders[1]
        ids = self._ids(tokenizer, prompts)
        pooled = _eos_pooled(encoder(ids).last_hidden_state, ids, tokenizer)
        return _unwrap(encoder).text_projection(pooled)

    def projected_token_features(self, tokens):
        # SDXL's tokens are [CLIP-L penultimate | CLIP-G penultimate]; the CLIP-G part, pooled, through CLIP-G's
        # final layer norm and text projection approximates the projected EOS feature (one layer short).
        encoder = _unwrap(self.text_encoders[1])
        width = encoder.config.hidden_size
        pooled = encoder.text_model.final_layer_norm(tokens[..., -width:].mean(dim=1))
        return encoder.text_projection(pooled)
