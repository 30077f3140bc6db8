"""What every backbone offers the training loop: prompts → conditions, images → latents, a prediction.

Backbones know nothing of methods; the loop knows only this interface.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = ["Conditioning", "Backbone"]


@dataclass
class Conditioning:
    """Encoded prompts for a batch; optional fields are per-family extras (SDXL pooled + time ids) and,
    for decoupled image cross-attention (IP-Adapter), the CLIP image embeddings ``[B, 1, E]`` the
    UNet's ``encoder_hid_proj`` turns into image tokens (zeros: the condition without the image)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None

    def _map(self, fn) -> Conditioning:
        return replace(
            self, **{f.name: fn(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None}
        )

    def __getitem__(self, index) -> Conditioning:
        return self._map(lambda t: t[index])

    def to(self, *args, **kwargs) -> Conditioning:
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> Conditioning:
        return self._map(lambda t: t.detach())

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        first = items[0]
        out = {}
        for f in fields(first):
            values = [getattr(c, f.name) for c in items]
            out[f.name] = None if values[0] is None else torch.cat(values, dim=0)
        return Conditioning(**out)


class Backbone:
    """Base class. Subclasses set the attributes below in ``__init__``.

    Attributes: ``family`` (str), ``denoiser`` (the trained network), ``vae``, ``text_encoders`` and
    ``tokenizers`` (lists, same order as the stock pipeline's ``text_encoder``, ``text_encoder_2``),
    ``noise_scheduler`` (a diffusers scheduler for training), ``parameterization``
    (:class:`accord.losses.Parameterization`), ``pipeline_class`` and ``source`` (what was loaded).
    """

    family: str = ""
    #: the trained network's name in the pipeline and in its LoRA loader (``unet_lora_layers`` …)
    denoiser_name: str = "unet"
    #: rewrites each prompt before it is tokenized (a method's hook, e.g. multi-vector textual
    #: inversion expands its token into all vector tokens); ``None`` leaves prompts as they are.
    prompt_transform = None

    def prepare_prompts(self, prompts: list[str]) -> list[str]:
        return list(prompts) if self.prompt_transform is None else [self.prompt_transform(p) for p in prompts]

    def check_config(self, config) -> None:
        """Reject training settings this family cannot honour (one-line ``ConfigError``); called by
        :class:`accord.methods.base.Method` once the backbone is loaded."""
        from ..errors import ConfigError

        t = config.train
        if t.timestep_shift is not None and self.family in ("sd", "sdxl"):
            raise ConfigError(f"train.timestep_shift is for flow models (flux, sd3), not {self.family}; set it to null "
                              "(train.min_timestep / train.max_timestep restrict DDPM timesteps)")
        num = self.noise_scheduler.config.num_train_timesteps
        if t.max_timestep is not None and t.max_timestep > num:
            raise ConfigError(f"train.max_timestep={t.max_timestep} exceeds this model's {num} training timesteps; "
                              f"use at most {num}")

    def encode_prompts(self, prompts: list[str]) -> Conditioning:  # pragma: no cover - interface
        raise NotImplementedError

    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # -- the VAE (every family encodes images the same way) -------------------------------------------
    def latent_distribution(self, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the VAE posterior (what latent caching stores)."""
        dist = self.vae.encode(pixel_values.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def latents_from(self, mean, std, generator=None) -> torch.Tensor:
        """Sample the posterior like ``DiagonalGaussianDistribution.sample``, then shift and scale as the
        pipelines undo it before decoding."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (mean + std * noise - shift) * self.vae.config.scaling_factor

    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from(*self.latent_distribution(pixel_values), generator=generator)

    @property
    def latent_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def pipeline(self):
        """A stock diffusers pipeline that shares this backbone's modules (for validation and saving)."""
        return self._pipe

    def projected_text_features(self, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - interface
        """CLIP projection-space features of prompts (PDLoss), with gradient through learned tokens."""
        raise NotImplementedError

    def projected_token_features(self, tokens: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """CLIP projection-space features of ``[B, N, D]`` tokens in the denoiser's text-token space
        (PDLoss's ``f_p`` of image-encoder methods), with gradient."""
        raise NotImplementedError

    def sample_timesteps(self, n: int, generator: torch.Generator, train_cfg) -> torch.Tensor:
        """Training timesteps as the model is fed them: integer DDPM indices here (uniform or
        logit-normal, paper Tab. 12, via diffusers' ``compute_density_for_timestep_sampling``), drawn
        from ``[train.min_timestep, train.max_timestep)``; flow-matching backbones override this to
        return ``σ·num_train_timesteps``."""
        return self._grid_indices(n, generator, train_cfg, *self._index_range(train_cfg))

    def _index_range(self, train_cfg) -> tuple[int, int]:
        """``[lo, hi)`` of training-grid indices allowed by ``train.min_timestep`` / ``train.max_timestep``."""
        num = self.noise_scheduler.config.num_train_timesteps
        lo = train_cfg.min_timestep or 0
        hi = num if train_cfg.max_timestep is None else train_cfg.max_timestep
        return lo, hi

    @staticmethod
    def _grid_indices(n: int, generator, train_cfg, lo: int, hi: int, shift: float | None = None) -> torch.Tensor:
        """``n`` indices in ``[lo, hi)``: uniform or logit-normal ``u``, optionally moved by the SD3 shift
        ``u' = s·u / (1 + (s−1)·u)`` (Esser et al. 2024, §5.3.2; kohya's ``discrete_flow_shift``). Without a
        shift and on the full range this draws exactly what it drew before these keys existed."""
        if train_cfg.timestep_sampling == "uniform" and shift is None:
            return torch.randint(lo, hi, (n,), generator=generator)
        if train_cfg.timestep_sampling == "uniform":
            u = torch.rand(n, generator=generator)
        else:
            from diffusers.training_utils import compute_density_for_timestep_sampling

            u = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=train_cfg.logit_mean,
                                                      logit_std=train_cfg.logit_std, generator=generator)
        if shift is not None:
            u = shift * u / (1 + (shift - 1) * u)
        return (lo + u * (hi - lo)).long().clamp(lo, hi - 1)

    def timesteps_at(self, fraction: torch.Tensor) -> torch.Tensor:
        """Training timesteps at ``fraction`` (in [0, 1)) of the way up the training grid, as the model is fed them:
        DDPM indices here; flow-matching backbones return ``σ·N`` of that grid point."""
        num = self.noise_scheduler.config.num_train_timesteps
        return (fraction * num).long().clamp(0, num - 1)

    # -- shared helpers ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in [self.vae, *self.text_encoders, self.denoiser] if m is not None]

    def add_tokens(self, tokens: list[str], initializer: str) -> list[list[int]]:
        """Add ``tokens`` to every tokenizer, grow each text encoder's embedding table, and initialise
        the new rows from ``initializer``'s first token. Returns the new ids per text encoder."""
        all_ids = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            added = tokenizer.add_tokens(tokens)
            if added != len(tokens):
                from ..errors import ConfigError

                raise ConfigError(
                    f"token(s) {tokens} already exist in the tokenizer; "
                    "choose a new placeholder like '<s*>' or '<new1>'"
                )
            init_ids = tokenizer.encode(initializer, add_special_tokens=False)
            if not init_ids:
                from ..errors import ConfigError

                raise ConfigError(f"initializer token {initializer!r} encodes to nothing; pick a plain word")
            if len(init_ids) > 1 and not all_ids:  # once, not per text encoder
                import warnings

                first, words = tokenizer.decode(init_ids[:1]).strip(), initializer.split()
                example = f", e.g. {words[-1]!r}" if len(words) > 1 else ""
                warnings.warn(f"initializer {initializer!r} (method.initializer_token, default data.class_noun) is "
                              f"{len(init_ids)} tokens; the new token(s) start from the first only, {first!r}; set "
                              f"method.initializer_token to the one word to start from{example}", UserWarning,
                              stacklevel=2)
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set below
            ids = tokenizer.convert_tokens_to_ids(tokens)
            table = encoder.get_input_embeddings().weight
            with torch.no_grad():
                for i in ids:
                    table[i] = table[init_ids[0]].clone()
            all_ids.append(ids)
        return all_ids
