"""Closed-form checks of DDLoss / PDLoss with pinned, hand-derived numbers, plus the contracts around them:
stop-gradients, dtypes, grid ends, error messages, the parameterization adapter and the CLIP feature helpers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from accord.losses import (
    Parameterization,
    UnsupportedSchedulerError,
    dd_loss,
    dependence_shift,
    image_features,
    pd_loss,
    text_features,
)

# joint, personal, general, null: ‖j−p‖² = 1, ‖j−g‖² = 1, ‖j−∅‖² = 0.25, so the bracket of Eq. 7 is 1.75
PINNED = [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.5]]
BRACKET = 1.75


def pinned(dtype=torch.float64, batch=1):
    return [torch.tensor([p] * batch, dtype=dtype) for p in PINNED]


def constant_beta(kind):
    """β_t = 0.1 everywhere on a 10-step grid, so ᾱ_t = 0.9^(t+1)."""
    return DDPMScheduler(
        num_train_timesteps=10, beta_start=0.1, beta_end=0.1, beta_schedule="linear", prediction_type=kind
    )


def shift_of(preds, sample, t, scheduler):
    return dependence_shift(*preds, sample=sample, timesteps=t, scheduler=scheduler)


# ----------------------------------------------------------------------------- pinned values
# Constant β = 0.1 at t = 1 (s = 0): a_t² = 0.81, b_t² = 0.19, a_s² = 0.9, b_s² = 0.1,
# α²_{t|s} = 0.9, σ²_{t|s} = 0.19 − 0.9·0.1 = 0.1. The x̂_0 coefficient of Eq. 7 is
# a_s²σ²_{t|s}/(2 b_t² b_s²) = 0.09/0.038, and a prediction difference maps to an x̂_0 difference by
#   sample: 1;  epsilon: −b_t/a_t (so b_t²/a_t² = 0.19/0.81);  v_prediction: −b_t (b_t² = 0.19).
# epsilon therefore gives a_s²σ²_{t|s}/(2 a_t² b_s²) = β_t/(2 α_t (1−ᾱ_{t−1})) = 0.1/(2·0.9·0.1) = 5/9,
# the familiar VP form; v_prediction gives a_s²σ²_{t|s}/(2 b_s²) = 0.09/0.2 = 0.45.
DDPM_PINNED = {
    "sample": 1.75 * 0.09 / 0.038,  # 4.144736842105263
    "epsilon": 1.75 * 5 / 9,  # 35/36
    "v_prediction": 1.75 * 0.45,  # 0.7875
}


@pytest.mark.parametrize("kind", sorted(DDPM_PINNED))
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_ddpm_pinned_value(cls, kind):
    scheduler = cls(num_train_timesteps=10, beta_start=0.1, beta_end=0.1, beta_schedule="linear", prediction_type=kind)
    sample = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    delta = shift_of(pinned(), sample, torch.tensor([1]), scheduler)
    assert delta.dtype == torch.float64
    assert delta.item() == pytest.approx(DDPM_PINNED[kind], rel=1e-6)  # alphas_cumprod is float32 in diffusers
    delta32 = shift_of(pinned(torch.float32), sample.float(), 1, scheduler)
    assert delta32.dtype == torch.float32 and delta32.item() == pytest.approx(DDPM_PINNED[kind], rel=1e-6)


def test_ddpm_pinned_sample_value_digits():
    assert DDPM_PINNED["sample"] == pytest.approx(4.144736842105263, abs=1e-12)
    assert DDPM_PINNED["epsilon"] == pytest.approx(35 / 36, abs=1e-12)


def test_epsilon_matches_vp_form_on_a_real_schedule():
    """Eq. 7 with ε-predictions is β_t/(2 α_t (1−ᾱ_{t−1}))·bracket_ε on any VP grid."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    acp = scheduler.alphas_cumprod.double()
    for t in (1, 37, 500, 999):
        # α_t from the grid itself: diffusers' float32 cumprod does not reproduce 1 − β_t to better than
        # ~1e-7 absolute, which is 1e-4 relative on β_1 ≈ 8.5e-4 (σ²_{t|s} = β_t is a difference).
        alpha = acp[t] / acp[t - 1]
        vp = (1 - alpha) / (2 * alpha * (1 - acp[t - 1])) * BRACKET
        delta = shift_of(pinned(), torch.zeros(1, 2, dtype=torch.float64), t, scheduler)
        assert delta.item() == pytest.approx(vp.item(), rel=1e-9)


# Flow matching, hand-derived. x_t = (1−σ)x_0 + σε, the model predicts u = ε − x_0, x̂_0 = x_t − σ·u.
# num_train_timesteps = 4, shift = 1: training sigmas 1, 0.75, 0.5, 0.25, timesteps σ·4 = 4, 3, 2, 1.
# At timestep 2: σ_t = 0.5, previous σ_s = 0.25, so a_t = b_t = 0.5, a_s = 0.75, b_s = 0.25,
#   α_{t|s} = 2/3, σ²_{t|s} = 0.25 − (4/9)(1/16) = 2/9,
#   m = a_s σ²_{t|s}/b_t² = 2/3,  σ̃² = σ²_{t|s} b_s²/b_t² = 1/18,  c_out = −σ_t = −1/2,
#   Δ = (m·c_out)²/(2σ̃²)·bracket = (1/9)/(1/9)·1.75 = 1.75.
# shift = 3: σ' = 3σ/(1+2σ) maps 0.25, 0.5, 0.75, 1 to 0.5, 0.75, 0.9, 1 (timesteps 2, 3, 3.6, 4).
# At timestep 3: σ_t = 0.75, σ_s = 0.5: a_t = 0.25, b_t = 0.75, a_s = b_s = 0.5, α_{t|s} = 0.5,
#   σ²_{t|s} = 0.5625 − 0.25·0.25 = 0.5; coefficient a_s²σ²_{t|s}/(2 b_t² b_s²)·σ_t²
#   = (0.125/0.28125)·0.5625 = 0.25, so Δ = 0.25·1.75 = 0.4375.
FLOW_PINNED = [(1.0, 2.0, 1.75), (3.0, 3.0, 0.4375)]


@pytest.mark.parametrize("shift, timestep, expected", FLOW_PINNED)
def test_flow_pinned_value(shift, timestep, expected):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=4, shift=shift)
    assert timestep in scheduler.timesteps.tolist()
    delta = shift_of(pinned(), torch.zeros(1, 2, dtype=torch.float64), torch.tensor([timestep]), scheduler)
    assert delta.item() == pytest.approx(expected, rel=1e-6)
    # dd_loss weights flow by σ_t: timestep/num_train_timesteps
    loss, parts = dd_loss(*pinned(), sample=torch.zeros(1, 2), timesteps=timestep, scheduler=scheduler, scale="sum")
    loss = loss.mean()  # per sample -> the batch mean
    assert parts["weight"].item() == pytest.approx(timestep / 4)
    assert loss.item() == pytest.approx(timestep / 4 * expected, rel=1e-6)


def test_flow_pinned_value_survives_set_timesteps():
    """Inference-time set_timesteps rewrites scheduler.sigmas; the training grid must not move."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=4, shift=3.0)
    scheduler.set_timesteps(2)
    delta = shift_of(pinned(), torch.zeros(1, 2, dtype=torch.float64), 3.0, scheduler)
    assert delta.item() == pytest.approx(0.4375, rel=1e-6)


def test_dynamic_shifting_uses_unshifted_training_sigmas():
    """With use_dynamic_shifting the training grid is unshifted whatever `shift` says (FLUX)."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=4, shift=3.0, use_dynamic_shifting=True)
    delta = shift_of(pinned(), torch.zeros(1, 2, dtype=torch.float64), 2.0, scheduler)
    assert delta.item() == pytest.approx(1.75, rel=1e-6)


# ----------------------------------------------------------------------------- dd_loss weighting
def test_dd_loss_weight_and_scales():
    scheduler = constant_beta("sample")
    # Batch of 3 at t = 1, 1, 0 with per-sample element count 2·3 = 6; the second sample has Δ < 0.
    j = torch.zeros(3, 2, 3, dtype=torch.float64)
    p, g, n = j.clone(), j.clone(), j.clone()
    p[0, 0, 0] = 1.0  # Δ_0 = +1·c
    n[1, 0, 0] = 1.0  # Δ_1 = −1·c
    p[2, 0, 0] = 1.0  # t = 0: no previous step
    t = torch.tensor([1, 1, 0])
    c = 0.09 / 0.038
    loss_sum, parts = dd_loss(j, p, g, n, sample=j, timesteps=t, scheduler=scheduler, scale="sum")
    loss_sum = loss_sum.mean()  # per sample -> the batch mean
    # rtol 1e-6: diffusers' alphas_cumprod is float32, so c carries float32 rounding
    close = {"rtol": 1e-6, "atol": 0}
    torch.testing.assert_close(parts["dependence_shift"], torch.tensor([c, -c, 0.0], dtype=torch.float64), **close)
    torch.testing.assert_close(parts["weight"], torch.tensor([0.1, 0.1, 0.0], dtype=torch.float64), **close)
    torch.testing.assert_close(parts["dd"], torch.tensor([0.1 * c, 0.1 * c, 0.0], dtype=torch.float64), **close)
    assert loss_sum.item() == pytest.approx(2 * 0.1 * c / 3)  # batch mean of (t/T)|Δ|
    loss_mean, parts_mean = dd_loss(j, p, g, n, sample=j, timesteps=t, scheduler=scheduler, scale="mean")
    loss_mean = loss_mean.mean()  # per sample -> the batch mean
    assert loss_mean.item() == pytest.approx(loss_sum.item() / 6)  # Δ divided by elements per sample
    torch.testing.assert_close(parts_mean["dependence_shift"], parts["dependence_shift"])  # Δ stays in nats
    # reference (the default): per element and divided by m_t = a_s·σ²_{t|s}/b_t² = √0.9·0.1/0.19 at t = 1
    loss_ref, parts_ref = dd_loss(j, p, g, n, sample=j, timesteps=t, scheduler=scheduler)
    loss_ref = loss_ref.mean()  # per sample -> the batch mean
    assert loss_ref.item() == pytest.approx(loss_sum.item() / 6 / (math.sqrt(0.9) * 0.1 / 0.19), rel=1e-6)
    assert parts_ref["dd"][2].item() == 0.0  # t = 0 (m_t = 0) stays 0, not inf or nan
    with pytest.raises(ValueError, match="reference, mean, sum"):
        dd_loss(j, p, g, n, sample=j, timesteps=t, scheduler=scheduler, scale="none")


# Hand-computed reference-scale values: the PINNED predictions (2 elements, bracket 1.75), Eq. 8's t/T, and
# m_t, the posterior coefficient on x̂_0, written out from the schedule by hand.
# Constant β = 0.1 on a 10-step grid:
#   t = 1: ᾱ_t = 0.81, ᾱ_s = 0.9, σ²_{t|s} = 0.19 − 0.9·0.1 = 0.1, m = √0.9·0.1/0.19, σ̃² = 0.1·0.1/0.19
#   t = 2: ᾱ_t = 0.729, ᾱ_s = 0.81, σ²_{t|s} = 0.271 − 0.9·0.19 = 0.1, m = 0.9·0.1/0.271, σ̃² = 0.1·0.19/0.271
# Eq. 7's coefficient on ‖Δpred‖² is a_s²σ²_{t|s}/(2 b_t² b_s²) times c_out² (1 for x₀, b_t²/a_t² for ε, b_t²
# for v). Flow (4-step grid): shift 1 at timestep 2: σ_t = 0.5, σ_s = 0.25, m = 0.75·(2/9)/0.25 = 2/3, Δ = 1.75;
# shift 3 at timestep 3: σ_t = 0.75, σ_s = 0.5, m = 0.5·0.5/0.5625 = 4/9, Δ = 0.4375.
REFERENCE_PINNED = [
    ("sample", 1, 1.75 * 0.09 / 0.038, math.sqrt(0.9) * 0.1 / 0.19),
    ("epsilon", 1, 1.75 * 0.1 / (2 * 0.9 * 0.1), math.sqrt(0.9) * 0.1 / 0.19),
    ("v_prediction", 1, 1.75 * 0.09 / 0.2, math.sqrt(0.9) * 0.1 / 0.19),
    ("sample", 2, 1.75 * 0.081 / (2 * 0.271 * 0.19), 0.9 * 0.1 / 0.271),
    ("epsilon", 2, 1.75 * 0.1 / (2 * 0.9 * 0.19), 0.9 * 0.1 / 0.271),
    ("v_prediction", 2, 1.75 * 0.081 / (2 * 0.19), 0.9 * 0.1 / 0.271),
]


@pytest.mark.parametrize("kind, t, delta, m", REFERENCE_PINNED)
def test_reference_scale_pinned_ddpm(kind, t, delta, m):
    scheduler = constant_beta(kind)
    loss, parts = dd_loss(*pinned(), sample=torch.zeros(1, 2, dtype=torch.float64), timesteps=t, scheduler=scheduler)
    loss = loss.mean()  # per sample -> the batch mean
    assert parts["dependence_shift"].item() == pytest.approx(delta, rel=1e-6)
    assert loss.item() == pytest.approx((t / 10) * delta / 2 / m, rel=1e-6)  # (t/T)·Δ per element / m_t


@pytest.mark.parametrize("shift, timestep, delta, m", [(1.0, 2.0, 1.75, 2 / 3), (3.0, 3.0, 0.4375, 4 / 9)])
def test_reference_scale_pinned_flow(shift, timestep, delta, m):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=4, shift=shift)
    loss, _ = dd_loss(*pinned(), sample=torch.zeros(1, 2), timesteps=timestep, scheduler=scheduler)
    loss = loss.mean()  # per sample -> the batch mean
    assert loss.item() == pytest.approx((timestep / 4) * delta / 2 / m, rel=1e-6)


def test_reference_scale_is_sudes_on_the_sd_schedule():
    """On SD's schedule the reference scale is the mean scale divided by diffusers' own posterior coefficient
    (what Facechain-SuDe calls posterior_mean_coef1 = β_t·√ᾱ_{t−1}/(1−ᾱ_t)), 1/m from 45 at t = 50 to 1,208 at
    t = 999; and a batch's loss is the mean of its samples' terms."""
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    acp = scheduler.alphas_cumprod.double()
    torch.manual_seed(0)
    preds = [torch.randn(3, 4, 8, 8, dtype=torch.float64) for _ in range(4)]
    t = torch.tensor([50, 500, 999])
    coef1 = scheduler.betas.double()[t] * acp[t - 1].sqrt() / (1 - acp[t])
    assert ((1 / coef1[0]).item() == pytest.approx(45.07, abs=0.01)
            and (1 / coef1[2]).item() == pytest.approx(1207.7, abs=0.1))
    _, mean_parts = dd_loss(*preds, sample=preds[0], timesteps=t, scheduler=scheduler, scale="mean")
    _ = _.mean()  # per sample -> the batch mean
    loss, parts = dd_loss(*preds, sample=preds[0], timesteps=t, scheduler=scheduler)
    loss = loss.mean()  # per sample -> the batch mean
    # 1e-4: diffusers keeps betas and alphas_cumprod in float32, and m_t is read from the latter (2e-5 apart at t=50)
    torch.testing.assert_close(parts["dd"], mean_parts["dd"] / coef1, rtol=1e-4, atol=0)
    assert loss.item() == pytest.approx(parts["dd"].mean().item(), rel=1e-12)


def test_scalar_timestep_broadcasts():
    scheduler = constant_beta("sample")
    preds = pinned(batch=4)
    torch.testing.assert_close(
        shift_of(preds, preds[0], 1, scheduler), shift_of(preds, preds[0], torch.ones(4, dtype=torch.long), scheduler)
    )


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("scale", ["reference", "mean", "sum"])
def test_gradient_reaches_joint_and_personal_only(scale):
    torch.manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    joint, personal, general, null = (torch.randn(2, 4, 3, 3, requires_grad=True) for _ in range(4))
    loss, _ = dd_loss(
        joint,
        personal,
        general,
        null,
        sample=torch.randn(2, 4, 3, 3),
        timesteps=torch.tensor([300, 700]),
        scheduler=scheduler,
        scale=scale,
    )
    loss = loss.mean()  # per sample -> the batch mean
    loss.backward()
    assert general.grad is None and null.grad is None  # the paper's stop-gradient
    assert joint.grad is not None and joint.grad.abs().sum() > 0
    assert personal.grad is not None and personal.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- dtypes and grid ends
GRID_ENDS = [
    pytest.param(DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon"), [0, 1, 999], id="ddpm-eps"),
    pytest.param(
        DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction"),
        [0, 1, 999],
        id="ddim-v",
    ),
    # zero terminal SNR: ᾱ_999 = 2⁻²⁴, the harshest end a real config produces
    pytest.param(
        DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True),
        [0, 1, 999],
        id="ddpm-v-zsnr",
    ),
    pytest.param(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), "ends", id="flow-shift3"),
]


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("scheduler, timesteps", GRID_ENDS)
def test_low_precision_inputs_and_grid_ends(scheduler, timesteps, low):
    if timesteps == "ends":
        timesteps = [scheduler.timesteps[-1].item(), scheduler.timesteps[-2].item(), scheduler.timesteps[0].item()]
    torch.manual_seed(1)
    preds32 = [torch.randn(3, 4, 4, 4) for _ in range(4)]
    t = torch.tensor(timesteps)
    low_preds = [p.to(low) for p in preds32]
    delta = shift_of(low_preds, low_preds[0], t, scheduler)
    assert delta.dtype == torch.float32 and torch.isfinite(delta).all()
    assert delta[0].item() == 0.0  # the grid's first point has no previous step
    # exactly the float32 computation on the (rounded) values the model produced ...
    torch.testing.assert_close(
        delta, shift_of([p.float() for p in low_preds], preds32[0], t, scheduler), rtol=1e-6, atol=0
    )
    # ... and close to the computation on the unrounded predictions
    reference = shift_of(preds32, preds32[0], t, scheduler)
    scale = reference.abs().max()
    assert ((delta - reference).abs() <= 0.05 * scale).all()
    for scale in ("reference", "mean", "sum"):
        loss, _ = dd_loss(*low_preds, sample=low_preds[0], timesteps=t, scheduler=scheduler, scale=scale)
        loss = loss.mean()  # per sample -> the batch mean
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_epsilon_with_zero_terminal_snr_is_refused_not_inf():
    """ᾱ_999 = 0 exactly: an ε-model's x̂_0 is undefined there, so DDLoss refuses the schedule up front
    (it used to return Δ = inf at t = 999); the forward process stays usable for the plain diffusion loss."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon", rescale_betas_zero_snr=True)
    with pytest.raises(UnsupportedSchedulerError, match="v_prediction"):
        shift_of(pinned(torch.float32), torch.zeros(1, 2), 500, scheduler)  # any t: fail on the first step
    param = Parameterization(scheduler)
    x0, noise, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 999])
    torch.testing.assert_close(param.add_noise(x0, noise, t)[1], noise[1])
    torch.testing.assert_close(param.training_target(x0, noise, t), noise)


# ----------------------------------------------------------------------------- errors
ALLOWED_CLASSES = ("DDPMScheduler", "DDIMScheduler", "FlowMatchEulerDiscreteScheduler")


@pytest.mark.parametrize(
    "scheduler", [EulerDiscreteScheduler(), EulerAncestralDiscreteScheduler()], ids=lambda s: type(s).__name__
)
def test_unknown_scheduler_class_names_allowed_ones(scheduler):
    with pytest.raises(UnsupportedSchedulerError) as info:
        shift_of(pinned(), torch.zeros(1, 2), 1, scheduler)
    message = str(info.value)
    assert type(scheduler).__name__ in message
    assert all(name in message for name in ALLOWED_CLASSES)
    assert isinstance(info.value, ValueError)


def test_unknown_prediction_type_names_allowed_ones():
    scheduler = DDPMScheduler(prediction_type="flow_prediction")
    with pytest.raises(UnsupportedSchedulerError) as info:
        dd_loss(*pinned(), sample=torch.zeros(1, 2), timesteps=1, scheduler=scheduler)
    message = str(info.value)
    assert "'flow_prediction'" in message
    assert all(kind in message for kind in ("epsilon", "v_prediction", "sample"))


@pytest.mark.parametrize(
    "scheduler, bad",
    [
        (DDPMScheduler(num_train_timesteps=10), -1),
        (DDPMScheduler(num_train_timesteps=10), 10),
        (DDIMScheduler(num_train_timesteps=10), 2.5),
        (FlowMatchEulerDiscreteScheduler(num_train_timesteps=10), 10.5),
        (FlowMatchEulerDiscreteScheduler(num_train_timesteps=10), -1.0),
        (FlowMatchEulerDiscreteScheduler(num_train_timesteps=10), float("nan")),
    ],
    ids=["ddpm-neg", "ddpm-T", "ddim-frac", "flow-above", "flow-neg", "flow-nan"],
)
def test_out_of_range_timesteps_raise(scheduler, bad):
    with pytest.raises(ValueError, match="timesteps"):
        shift_of(pinned(), torch.zeros(1, 2), torch.tensor([bad]), scheduler)


# ----------------------------------------------------------------------------- the adapter
ADAPTER_SCHEDULERS = [
    pytest.param(
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=k), id=f"ddpm-{k}"
    )
    for k in ("epsilon", "v_prediction", "sample")
] + [
    pytest.param(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=s), id=f"flow-shift{s:g}")
    for s in (1.0, 3.0)
]


@pytest.mark.parametrize("scheduler", ADAPTER_SCHEDULERS)
def test_adapter_round_trip_and_diffusers_agreement(scheduler):
    torch.manual_seed(2)
    param = Parameterization(scheduler)
    flow = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    t = scheduler.timesteps[[0, 250, 500, 998]] if flow else torch.tensor([1, 250, 500, 999])
    x0, noise = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    x_t = param.add_noise(x0, noise, t)
    target = param.training_target(x0, noise, t)
    torch.testing.assert_close(param.x0_from_prediction(target, x_t, t), x0)
    # the forward process and targets are diffusers' own
    if flow:
        expected = scheduler.scale_noise(x0.float(), t, noise.float())
        torch.testing.assert_close(x_t.float(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(target, noise - x0)
    else:
        torch.testing.assert_close(x_t.float(), scheduler.add_noise(x0.float(), noise.float(), t), rtol=1e-5, atol=1e-5)
        if scheduler.config.prediction_type == "v_prediction":
            torch.testing.assert_close(
                target.float(), scheduler.get_velocity(x0.float(), noise.float(), t), rtol=1e-5, atol=1e-5
            )
    c = param.coefficients(t)
    assert c.var.dtype == torch.float32 and bool(c.valid.all())
    weight = t / 1000 if not flow else t.double() / 1000
    torch.testing.assert_close(c.weight, weight.float())


# ----------------------------------------------------------------------------- PDLoss
def test_pd_loss_pinned_value_and_mask():
    f_p = torch.tensor([[1.0, 0.0]])
    f_s = torch.tensor([0.0, 1.0])  # [E]: one superclass for the batch
    f_g = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    # cos_pg = (1, 1/√2), cos_sg = (0, 1/√2): |1 − 0| and |1/√2 − 1/√2| average to 0.5
    loss, parts = pd_loss(f_p, f_s, f_g)
    loss = loss.mean()  # per sample -> the batch mean
    assert loss.item() == pytest.approx(0.5)
    assert parts["cos_pg"].item() == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert parts["cos_sg"].item() == pytest.approx(1 / (2 * math.sqrt(2)))
    loss, _ = pd_loss(f_p, f_s, f_g, mask=torch.tensor([[True, False]]))
    loss = loss.mean()  # per sample -> the batch mean
    assert loss.item() == pytest.approx(1.0)


def test_pd_loss_zero_when_personal_equals_superclass():
    torch.manual_seed(3)
    f_s = torch.randn(4, 8)
    loss, parts = pd_loss(f_s.clone(), f_s, torch.randn(4, 5, 8), mask=torch.rand(4, 5) > 0.3)
    loss = loss.mean()  # per sample -> the batch mean
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    assert parts["pd"].abs().max() < 1e-7


def test_pd_loss_masked_concepts_are_ignored_and_empty_samples_count_zero():
    torch.manual_seed(4)
    f_p, f_s, f_g = torch.randn(3, 8), torch.randn(8), torch.randn(3, 4, 8)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False], [False, False, False, False]])
    loss, parts = pd_loss(f_p, f_s, f_g, mask=mask)
    loss = loss.mean()  # per sample -> the batch mean
    changed = f_g.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 8) * 100
    changed[0, 3] = 0.0  # a zero padding vector, too
    loss2, parts2 = pd_loss(f_p, f_s, changed, mask=mask)
    loss2 = loss2.mean()  # per sample -> the batch mean
    assert loss2.item() == loss.item()
    for key in parts:
        torch.testing.assert_close(parts2[key], parts[key], rtol=0, atol=0)
    assert parts["pd"][2].item() == 0.0  # the third sample has no general concept
    assert loss.item() == pytest.approx(parts["pd"].sum().item() / 3)  # and still counts in the batch mean
    # unmasked concepts do matter
    changed[0, 0] = torch.randn(8)
    assert pd_loss(f_p, f_s, changed, mask=mask)[0].mean().item() != loss.item()


def test_pd_loss_gradient_reaches_personal_only():
    torch.manual_seed(5)
    f_p, f_s, f_g = (torch.randn(*shape, requires_grad=True) for shape in [(2, 8), (2, 8), (2, 3, 8)])
    loss, _ = pd_loss(f_p, f_s, f_g)
    loss = loss.mean()  # per sample -> the batch mean
    loss.backward()
    assert f_p.grad is not None and f_p.grad.abs().sum() > 0
    assert f_s.grad is None and f_g.grad is None


def test_pd_loss_low_precision_and_shape_errors():
    torch.manual_seed(6)
    f_p, f_s, f_g = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 3, 8)
    loss_bf16, _ = pd_loss(f_p.bfloat16(), f_s.bfloat16(), f_g.bfloat16())
    loss_bf16 = loss_bf16.mean()  # per sample -> the batch mean
    assert loss_bf16.dtype == torch.float32 and torch.isfinite(loss_bf16)
    assert loss_bf16.item() == pytest.approx(pd_loss(f_p, f_s, f_g)[0].mean().item(), abs=2e-2)
    with pytest.raises(ValueError, match=r"\[B, G, E\]"):
        pd_loss(f_p, f_s, f_g[:, 0])


# ----------------------------------------------------------------------------- CLIP feature helpers
def _text_config(projection_dim=16):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def test_text_features_shape_and_gradient_to_token_embedding(clip_tokenizer):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(7)
    encoder = CLIPTextModelWithProjection(_text_config()).eval()
    batch = clip_tokenizer(
        ["a photo of sks backpack", "backpack", "a girl", "a mountain"],
        padding="max_length",
        max_length=16,
        truncation=True,
        return_tensors="pt",
    )
    feats = text_features(encoder, batch.input_ids, batch.attention_mask)
    assert feats.shape == (4, 16)
    # PDLoss on real token ids: personal prompt vs superclass, the two scenes as general concepts
    loss, _ = pd_loss(feats[:1], feats[1:2], feats[2:].unsqueeze(0))
    loss = loss.mean()  # per sample -> the batch mean
    loss.backward()
    grad = encoder.text_model.embeddings.token_embedding.weight.grad
    sks = clip_tokenizer.convert_tokens_to_ids("sks</w>")
    assert grad[sks].abs().sum() > 0  # the trigger's embedding row is trained
    assert grad[clip_tokenizer.convert_tokens_to_ids("girl</w>")].abs().sum() == 0  # f_g is stop-gradient
    assert grad[1000].abs().sum() == 0  # an unused row
    with pytest.raises(TypeError, match="CLIPTextModelWithProjection"):
        text_features(CLIPTextModel(_text_config()), batch.input_ids)


def test_image_features_shape_and_gradient():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(8)
    config = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=16,
    )
    encoder = CLIPVisionModelWithProjection(config).eval()
    feats = image_features(encoder, torch.randn(3, 3, 32, 32))
    assert feats.shape == (3, 16)
    loss, _ = pd_loss(feats[:1], torch.randn(16), torch.randn(1, 2, 16))
    loss = loss.mean()  # per sample -> the batch mean
    loss.backward()
    assert encoder.visual_projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_diffusers(prediction_type):
    """The adapter's min-SNR weights equal diffusers' compute_snr recipe (the loop's only use of SNR)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from accord.losses import Parameterization

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    t = torch.tensor([0, 10, 300, 999])
    snr = compute_snr(scheduler, t)
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    expected = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
    torch.testing.assert_close(Parameterization(scheduler).min_snr_weight(t, 5.0), expected.float(), rtol=1e-5, atol=0)
