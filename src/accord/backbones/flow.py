"""What FLUX.1 and SD3 share: a transformer trained by flow matching on a VAE latent.

Noise is ``x_t = (1−σ)·x_0 + σ·ε`` and the model predicts the velocity ``ε − x_0`` (DESIGN.md's table,
last row); timesteps are ``σ·num_train_timesteps`` on the training sigma grid of the pipeline's
``FlowMatchEulerDiscreteScheduler``, which is also where DDLoss finds each step's previous point.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..losses import Parameterization
from .base import Backbone

__all__ = ["FlowBackbone"]


class FlowBackbone(Backbone):
    """Base of the flow-matching families. Subclasses set ``family`` and the text-encoder lists."""

    denoiser_name = "transformer"
    #: latent height and width must be multiples of this (2×2 patches)
    patch = 2

    def __init__(self, pipe, source: str):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.source = source
        self.pipeline_class = type(pipe)
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self._pipe = pipe
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ConfigError(f"{source}: a {self.family} model needs a FlowMatchEulerDiscreteScheduler, "
                              f"found {type(pipe.scheduler).__name__}")
        # A fresh copy: its grid is the training one, whatever set_timesteps later does to the pipeline's.
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        self.parameterization = Parameterization(self.noise_scheduler)
        self._grid = torch.sort(self.noise_scheduler.timesteps.float()).values  # σ·N, ascending

    def check_config(self, config) -> None:
        super().check_config(config)
        if config.train.snr_gamma:
            raise ConfigError(f"train.snr_gamma is for DDPM-style sd/sdxl; {self.family} is trained by flow matching, "
                              "set train.snr_gamma to null (use train.timestep_sampling=logit_normal instead)")

    def sample_timesteps(self, n: int, generator: torch.Generator, train_cfg) -> torch.Tensor:
        """``σ·N`` on the training grid: grid index ``u·N`` (uniform, or logit-normal ``u`` as in SD3's
        paper, Esser et al. 2024, §3.1) with σ increasing in ``u``, so ``train.logit_mean > 0`` favours
        noisier steps. (diffusers' flow scripts index the descending grid, which flips that sign.)
        ``train.timestep_shift`` s moves ``u`` to ``s·u/(1+(s−1)·u)`` (SD3's shift, on top of the grid's own:
        FLUX's grid is unshifted, SD3's already carries its scheduler's shift); ``train.min_timestep`` /
        ``max_timestep`` keep the draw to grid points with ``min ≤ σ·N ≤ max``."""
        lo, hi = self._index_range(train_cfg)
        return self._grid[self._grid_indices(n, generator, train_cfg, lo, hi, shift=train_cfg.timestep_shift)]

    def _index_range(self, train_cfg) -> tuple[int, int]:
        """Grid indices whose ``σ·N`` lies in ``[train.min_timestep, train.max_timestep]``."""
        lo_t = train_cfg.min_timestep or 0
        hi_t = float("inf") if train_cfg.max_timestep is None else train_cfg.max_timestep
        inside = ((self._grid >= lo_t) & (self._grid <= hi_t)).nonzero().flatten()
        if not len(inside):
            from ..errors import ConfigError

            raise ConfigError(
                f"train.min_timestep={train_cfg.min_timestep} / train.max_timestep={train_cfg.max_timestep} "
                f"hold no point of this model's sigma grid ({float(self._grid[0]):.4g} to "
                f"{float(self._grid[-1]):.4g}); widen the range"
            )
        return int(inside[0]), int(inside[-1]) + 1

    def timesteps_at(self, fraction: torch.Tensor) -> torch.Tensor:
        """``σ·N`` of the training grid point at ``fraction`` of the way up (σ increasing)."""
        return self._grid[super().timesteps_at(fraction)]

    def _check_size(self, latents: torch.Tensor) -> None:
        h, w = latents.shape[-2:]
        if h % self.patch or w % self.patch:
            step = self.patch * self.latent_scale
            raise ConfigError(f"{self.family} needs image sides that are multiples of {step} pixels, got "
                              f"{h * self.latent_scale}x{w * self.latent_scale}; change data.resolution")

