"""One adapter from a diffusers scheduler to the Gaussian quantities the losses need.

Every supported family noises data as ``x_t = a_t·x_0 + b_t·ε`` (DESIGN.md, "One formula for every
diffusion parameterization"). The model's raw output is turned into the clean-sample estimate with
k-diffusion's skip/out form (``external.py`` there), ``x̂_0 = c_skip·x_t + c_out·prediction``:

================================  =========  ==========  ========  ================
family / ``prediction_type``      a_t        b_t         c_skip    c_out
================================  =========  ==========  ========  ================
DDPM/DDIM ``"epsilon"``           √ᾱ_t       √(1−ᾱ_t)    1/a_t     −b_t/a_t
DDPM/DDIM ``"v_prediction"``      √ᾱ_t       √(1−ᾱ_t)    a_t       −b_t
DDPM/DDIM ``"sample"``            √ᾱ_t       √(1−ᾱ_t)    0         1
flow matching (velocity ε − x_0)  1 − σ_t    σ_t         1         −σ_t
================================  =========  ==========  ========  ================

For the previous point ``s`` of the *training* grid the forward kernel is
``x_t | x_s ~ N(α_{t|s}·x_s, σ²_{t|s})`` with ``α_{t|s} = a_t/a_s`` and
``σ²_{t|s} = b_t² − α_{t|s}²·b_s²``; the posterior ``q(x_s | x_t, x_0)`` is Gaussian with the
coefficient ``m_t = a_s·σ²_{t|s}/b_t²`` on ``x_0`` and variance ``σ̃²_t = σ²_{t|s}·b_s²/b_t²``.

This module is the only place in accord that branches on the parameterization.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Parameterization", "PosteriorCoefficients", "UnsupportedSchedulerError", "SUPPORTED"]

_DDPM_LIKE = ("DDPMScheduler", "DDIMScheduler")
_FLOW = ("FlowMatchEulerDiscreteScheduler",)
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

#: Human-readable list of what the adapter accepts, used in every error message.
SUPPORTED = (
    f"scheduler classes {', '.join(_DDPM_LIKE + _FLOW)}; "
    f"prediction_type {', '.join(_PREDICTION_TYPES)} for the DDPM/DDIM ones (flow matching predicts velocity)"
)


class UnsupportedSchedulerError(ValueError):
    """The scheduler class or its prediction type is not one accord knows how to read."""


@dataclass(frozen=True)
class PosteriorCoefficients:
    """Per-sample scalars, each shaped ``[B]``, float32 or float64.

    ``c_out`` maps a prediction difference to an ``x̂_0`` difference; ``m`` maps an ``x̂_0`` difference
    to a posterior-mean difference ``U_j − U_c``; ``var`` is the reverse-step variance ``σ̃²_t``;
    ``weight`` is Eq. 8's ``t/T``; ``valid`` is False where the grid has no previous step.
    """

    c_skip: torch.Tensor
    c_out: torch.Tensor
    m: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor
    valid: torch.Tensor


class Parameterization:
    """Read a diffusers scheduler's *training* grid once and answer per-timestep questions.

    Tables are computed in float64 from the scheduler's training arrays (``alphas_cumprod`` for
    DDPM/DDIM; for flow matching the unshifted-or-shifted training sigmas of a fresh instance built from
    the config, i.e. the very float32 grid the noise was drawn with), so inference-time calls to
    ``set_timesteps`` on the same scheduler do not change them.
    """

    def __init__(self, scheduler):
        name = type(scheduler).__name__
        config = scheduler.config
        self.num_train_timesteps = int(config.num_train_timesteps)
        if name in _DDPM_LIKE:
            prediction_type = config.prediction_type
            if prediction_type not in _PREDICTION_TYPES:
                raise UnsupportedSchedulerError(
                    f"{name} has prediction_type={prediction_type!r}; accord supports {SUPPORTED}."
                )
            self.kind = prediction_type
            acp = np.asarray(scheduler.alphas_cumprod.double().cpu().numpy(), dtype=np.float64)
            a = np.sqrt(acp)
            b = np.sqrt(1.0 - acp)
            # Grid index t has its previous point at t−1; index 0 has none.
            self._grid_t = np.arange(self.num_train_timesteps, dtype=np.float64)
            self._a, self._b = a, b
            # Zero terminal SNR (ᾱ_T = 0) leaves x̂_0 = (x_t − b·ε̂)/a undefined for ε-models: refuse in
            # coefficients() (Δ would be inf and poison training) but keep add_noise/training_target usable.
            self._x0_undefined = prediction_type == "epsilon" and bool(np.any(a == 0))
        elif name in _FLOW:
            self.kind = "flow"
            # The training sigmas exactly as the model was noised with them: a fresh instance's float32
            # grid (shifted unless use_dynamic_shifting), untouched by set_timesteps. Recomputing them in
            # float64 instead misses that grid by ~1e-7, which the step variance σ²_{t|s} (a difference of
            # neighbours ~3e-4 apart at shift 3) amplifies to ~2e-4 relative error in Δ.
            fresh = type(scheduler).from_config(config)
            self._sigmas = np.sort(fresh.sigmas.double().cpu().numpy())  # ascending: smallest … 1
            self._x0_undefined = False
        else:
            raise UnsupportedSchedulerError(f"scheduler class {name} is not supported; accord supports {SUPPORTED}.")

    # ------------------------------------------------------------------ noise levels
    def _levels(self, timesteps: torch.Tensor) -> tuple[np.ndarray, ...]:
        """Return ``a_t, b_t, a_s, b_s, weight, valid`` as float64 numpy arrays."""
        t = timesteps.detach().double().cpu().reshape(-1).numpy()
        if self.kind == "flow":
            n = self.num_train_timesteps
            if not np.all(np.isfinite(t)) or np.any((t < 0) | (t > n * (1 + 1e-6))):
                raise ValueError(f"flow-matching timesteps must be sigma·{n}, sigma in [0, 1]; got {t.tolist()[:8]}")
            sigma_t = t / n
            # A timestep from scheduler.timesteps is a float32 copy of a grid sigma·n: use that grid sigma.
            grid = self._sigmas
            near = np.clip(np.searchsorted(grid, sigma_t), 1, len(grid) - 1)
            near = np.where(np.abs(grid[near - 1] - sigma_t) < np.abs(grid[near] - sigma_t), near - 1, near)
            sigma_t = np.where(np.abs(grid[near] - sigma_t) <= 1e-6 * sigma_t, grid[near], sigma_t)
            # Previous point: the largest training sigma strictly below sigma_t (tolerant to float noise).
            idx = np.searchsorted(self._sigmas, sigma_t * (1 - 1e-6), side="left") - 1
            valid = idx >= 0
            sigma_s = np.where(valid, self._sigmas[np.clip(idx, 0, None)], 0.0)
            return 1 - sigma_t, sigma_t, 1 - sigma_s, sigma_s, sigma_t, valid
        ti = np.rint(t).astype(np.int64)
        if np.any((ti < 0) | (ti >= self.num_train_timesteps)) or np.any(np.abs(ti - t) > 1e-6):
            raise ValueError(
                f"timesteps must be integer training indices in [0, {self.num_train_timesteps - 1}], "
                f"got {t.tolist()[:8]}"
            )
        valid = ti >= 1
        si = np.clip(ti - 1, 0, None)
        return self._a[ti], self._b[ti], self._a[si], self._b[si], ti / self.num_train_timesteps, valid

    def coefficients(self, timesteps: torch.Tensor, dtype=torch.float32, device=None) -> PosteriorCoefficients:
        if self._x0_undefined:
            raise UnsupportedSchedulerError(
                "prediction_type='epsilon' cannot give x̂_0 where ᾱ_t = 0, and this schedule has zero terminal SNR "
                "(rescale_betas_zero_snr=True); use prediction_type='v_prediction' (what zero-SNR training needs) "
                "or a schedule with ᾱ_T > 0."
            )
        a_t, b_t, a_s, b_s, weight, valid = self._levels(timesteps)
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha_ts = a_t / a_s
            var_ts = b_t**2 - alpha_ts**2 * b_s**2  # σ²_{t|s}
            m = a_s * var_ts / b_t**2  # coefficient of x_0 in the posterior mean
            var = var_ts * b_s**2 / b_t**2  # σ̃²_t, the reverse-step variance
            if self.kind == "epsilon":
                c_skip, c_out = 1 / a_t, -b_t / a_t
            elif self.kind == "v_prediction":
                c_skip, c_out = a_t, -b_t
            elif self.kind == "sample":
                c_skip, c_out = np.zeros_like(a_t), np.ones_like(a_t)
            else:  # flow: x̂_0 = x_t − σ_t·u
                c_skip, c_out = np.ones_like(a_t), -b_t
        # Where no previous step exists the posterior is a point mass: mark invalid, keep numbers finite.
        m = np.where(valid, m, 0.0)
        var = np.where(valid, var, 1.0)

        def as_tensor(x):
            return torch.as_tensor(np.asarray(x, dtype=np.float64), device=device).to(dtype)

        return PosteriorCoefficients(
            c_skip=as_tensor(c_skip),
            c_out=as_tensor(c_out),
            m=as_tensor(m),
            var=as_tensor(var),
            weight=as_tensor(weight),
            valid=torch.as_tensor(valid, device=device),
        )

    # ------------------------------------------------------------------ conversions
    def x0_from_prediction(self, prediction: torch.Tensor, sample: torch.Tensor,
                           timesteps: torch.Tensor) -> torch.Tensor:
        """``x̂_0 = c_skip·x_t + c_out·prediction``, in the prediction's (at least float32) dtype."""
        dtype = torch.promote_types(prediction.dtype, torch.float32)
        c = self.coefficients(timesteps, dtype=dtype, device=prediction.device)
        shape = (-1,) + (1,) * (prediction.dim() - 1)
        return c.c_skip.view(shape) * sample.to(dtype) + c.c_out.view(shape) * prediction.to(dtype)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model is trained to predict for ``x_t = a_t·x_0 + b_t·noise``."""
        if self.kind == "flow":
            return noise - x0
        if self.kind == "epsilon":
            return noise
        if self.kind == "sample":
            return x0
        a_t, b_t, *_ = self._levels(timesteps)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = torch.as_tensor(a_t, device=x0.device, dtype=x0.dtype).view(shape)
        b = torch.as_tensor(b_t, device=x0.device, dtype=x0.dtype).view(shape)
        return a * noise - b * x0

    def min_snr_weight(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ loss weights (Hang et al., 2023) for this parameterization's target, per sample:
        ``min(SNR, γ)/SNR`` for ε, ``min(SNR, γ)/(SNR + 1)`` for v, ``min(SNR, γ)`` for x₀, with
        ``SNR = a_t²/b_t²`` (the weights diffusers' training scripts use with ``compute_snr``)."""
        if self.kind == "flow":
            raise ValueError("min-SNR weighting is defined for DDPM-style schedules, not flow matching")
        a_t, b_t, *_ = self._levels(timesteps)
        snr = torch.as_tensor(a_t**2 / b_t**2)
        clipped = torch.clamp(snr, max=gamma)
        weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[self.kind]
        return weight.float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = a_t·x_0 + b_t·noise`` for the given timesteps (the trainer's forward process)."""
        a_t, b_t, *_ = self._levels(timesteps)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a = torch.as_tensor(a_t, device=x0.device, dtype=x0.dtype).view(shape)
        b = torch.as_tensor(b_t, device=x0.device, dtype=x0.dtype).view(shape)
        return a * x0 + b * noise
