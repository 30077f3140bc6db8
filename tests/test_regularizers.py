"""Comparator regularizers: SuDe and ClassDiffusion pinned in closed form, SuDe's truncation, where
gradient flows, zero weights skip their passes, and short training runs log finite components."""

from __future__ import annotations

import math
import re

import pytest
import torch
from diffusers import DDPMScheduler
from trainkit import tiny_config as _tiny

from accord.config import RegularizerConfig
from accord.errors import ConfigError
from accord.losses import classdiffusion_loss, sude_loss


def tiny_config(model, refs, out, regularizers=None, **sections):
    """trainkit's tiny LoRA run with a ``regularizers`` section."""
    config = _tiny(model, refs, out, **sections)
    config.regularizers = RegularizerConfig(**(regularizers or {}))
    return config.validate()

# betas 0.1, 0.2, 0.3, 0.4: α_t = 1 − β_t, ᾱ = 0.9, 0.72, 0.504, 0.3024
SCHED = DDPMScheduler(num_train_timesteps=4, beta_schedule="linear", beta_start=0.1, beta_end=0.4)


def _preds(dist_cat: float, dist_null: float, batch: int = 1):
    """subject = 0; ‖subject − category‖² = dist_cat, ‖subject − null‖² = dist_null over 4 elements."""
    subject = torch.zeros(batch, 1, 2, 2, requires_grad=True)
    category = torch.full((batch, 1, 2, 2), math.sqrt(dist_cat / 4), requires_grad=True)
    null = torch.full((batch, 1, 2, 2), math.sqrt(dist_null / 4), requires_grad=True)
    return subject, category, null


def test_sude_pinned_vp_value():
    # ε-model: β_t² / (2σ̃²·α_t·(1−ᾱ_t)) = β_t / (2·α_t·(1−ᾱ_{t−1})); t=2: 0.3 / (2·0.7·0.28) = 0.765306…
    s, c, n = _preds(4.0, 1.0)
    per, comps = sude_loss(s, c, n, timesteps=torch.tensor([2]), scheduler=SCHED, scale="sum")
    assert per.shape == (1,)
    assert per.item() == pytest.approx(3 * 0.3 / (2 * 0.7 * 0.28), rel=1e-6)
    assert per.item() == pytest.approx(2.2959184, rel=1e-6)
    mean, _ = sude_loss(s, c, n, timesteps=torch.tensor([2]), scheduler=SCHED, scale="mean")
    assert mean.item() == pytest.approx(2.2959184 / 4, rel=1e-6)  # per element of the 4-element sample
    # reference (default): per element over posterior_mean_coef1 = β_t·√ᾱ_{t−1}/(1−ᾱ_t) = 0.3·√0.72/0.496
    ref, _ = sude_loss(s, c, n, timesteps=torch.tensor([2]), scheduler=SCHED)
    assert ref.item() == pytest.approx(2.2959184 / 4 / (0.3 * math.sqrt(0.72) / 0.496), rel=1e-5)
    assert comps["sude_nats"].item() == pytest.approx(2.2959184, rel=1e-6) and comps["sude_active"].item() == 1
    # no previous step at t = 0: no reverse step, no loss
    assert sude_loss(s, c, n, timesteps=torch.tensor([0]), scheduler=SCHED)[0].item() == 0


def test_sude_truncation_zeroes_the_loss_below_the_threshold():
    s, c, n = _preds(4.0, 1.0)
    t = torch.tensor([2])
    kept = sude_loss(s, c, n, timesteps=t, scheduler=SCHED, truncation=2.0, scale="sum")
    cut = sude_loss(s, c, n, timesteps=t, scheduler=SCHED, truncation=2.5, scale="sum")
    assert kept[0].item() == pytest.approx(2.2959184, rel=1e-6)
    assert cut[0].item() == 0 and cut[1]["sude_active"].item() == 0
    assert cut[1]["sude_nats"].item() == pytest.approx(2.2959184, rel=1e-6)  # still logged untruncated
    # closer to ∅ than to the category is a negative log-ratio: truncated at a fixed 0 nats (τ = 1)
    s, c, n = _preds(1.0, 4.0)
    per, comps = sude_loss(s, c, n, timesteps=t, scheduler=SCHED, truncation=0.0)
    assert per.item() == 0 and comps["sude_nats"].item() == pytest.approx(-2.2959184, rel=1e-6)
    per.sum().backward()
    assert s.grad.abs().sum() == 0  # a truncated sample sends no gradient


def _official_sude(eps_sub, eps_cate, eps_null, x_t, t, scheduler):
    """A re-statement, in numpy, of Facechain-SuDe's official ε-model code (modelscope/facechain,
    more_apps/Facechain-SuDe/ldm/models/diffusion/ddpm.py: prob_loss_func_class and the SuDe term of p_losses)
    for a batch of one: returns (prob_loss · (1/posterior_mean_coef1[t]), loss_delta)."""
    import numpy as np

    betas = scheduler.betas.double().numpy()
    acp = np.cumprod(1 - betas)
    acp_prev = np.append(1.0, acp[:-1])
    coef1 = betas * np.sqrt(acp_prev) / (1 - acp)
    coef2 = (1 - acp_prev) * np.sqrt(1 - betas) / (1 - acp)
    var = betas * (1 - acp_prev) / (1 - acp)  # posterior_variance (v_posterior = 0)

    def mean(eps):  # posterior mean from predict_start_from_noise (LatentDiffusion: clip_denoised = False)
        x0 = np.sqrt(1 / acp[t]) * x_t - np.sqrt(1 / acp[t] - 1) * eps
        return coef1[t] * x0 + coef2[t] * x_t

    x_t1, mu_c, mu = mean(eps_sub), mean(eps_cate), mean(eps_null)
    x_c = mean(eps_cate)
    loss = (((x_t1 - mu_c) ** 2).mean() - ((x_t1 - mu) ** 2).mean()) / (2 * var[t] + 1e-6)
    loss_refer = (((x_c - mu_c) ** 2) - ((x_c - mu) ** 2)).mean() / (2 * var[t] + 1e-6)
    return loss / coef1[t], float(loss - loss_refer > 0)


def test_sude_matches_the_official_code():
    """Values and the truncation (loss_delta) of the default, against the official rule re-stated above: random
    predictions on SD's schedule, each sample on its own, half of them built to fall below the category's own."""
    import numpy as np

    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012)
    rng = np.random.default_rng(0)
    actives = []
    for i, t in enumerate([60, 200, 450, 700, 900, 999, 300, 800]):
        x_t, cate, null = (rng.standard_normal((4, 4, 4)) for _ in range(3))
        # subjects near the category are classified as it more surely than the category itself: truncated
        subject = cate + 0.3 * (cate - null) if i % 2 else rng.standard_normal((4, 4, 4))
        ref, active = _official_sude(subject, cate, null, x_t, t, scheduler)
        per, comps = sude_loss(*(torch.from_numpy(a[None]) for a in (subject, cate, null)), timesteps=torch.tensor([t]),
                               scheduler=scheduler)
        assert comps["sude_active"].item() == active, t
        assert per.item() == pytest.approx(ref * active, rel=1e-3), t  # 1e-3: the official 2σ² + 1e-6
        actives.append(active)
    assert 0 < sum(actives) < len(actives)  # both sides of the rule were exercised


def test_sude_gradient_reaches_only_the_subject_prediction():
    s, c, n = _preds(4.0, 1.0)
    per, _ = sude_loss(s, c, n, timesteps=torch.tensor([2]), scheduler=SCHED, scale="sum")
    per.sum().backward()
    assert c.grad is None and n.grad is None  # sg[·] of the paper
    # d/ds of k·(‖s−c‖² − ‖s−n‖²) = 2k·(n − c), k = 0.765306…
    expected = 2 * (0.3 / (2 * 0.7 * 0.28)) * (n.detach() - c.detach())
    assert torch.allclose(s.grad, expected, rtol=1e-5)


def test_classdiffusion_pinned_value_and_gradient():
    f_p = torch.tensor([[1.0, 0.0], [2.0, 2.0]], requires_grad=True)
    f_c = torch.tensor([1.0, 1.0], requires_grad=True)  # [E]: one class phrase for the batch
    per, comps = classdiffusion_loss(f_p, f_c)
    assert per.tolist() == pytest.approx([1 - 1 / math.sqrt(2), 0.0], abs=1e-6)
    assert comps["cos_pc"].tolist() == pytest.approx([1 / math.sqrt(2), 1.0], abs=1e-6)
    per.sum().backward()
    assert f_c.grad is None  # the class anchor stays put; only the personal concept moves
    # d(1 − cos)/df_p at f_p = (1, 0), f_c = (1, 1)/√2: −(f_c/‖f_c‖ − cos·f_p/‖f_p‖)/‖f_p‖ = (0, −1/√2)
    assert f_p.grad[0].tolist() == pytest.approx([0.0, -1 / math.sqrt(2)], abs=1e-6)


def test_negative_weights_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="regularizers.sude_weight=-1"):
        tiny_config(tmp_path, tmp_path, tmp_path / "o", regularizers={"sude_weight": -1})


# ---------------------------------------------------------------------------- in the trainer


def _step(config):
    """One micro-batch of run_step on a fresh seeded model: (losses, UNet gradients, UNet forward batch
    sizes, text-encoder forwards). Each schedule runs its own backward passes."""
    from accelerate import Accelerator

    from accord.backbones import load_backbone
    from accord.methods import get_method
    from accord.step import TextCache, run_step
    from accord.train import _Batches, _build_data

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    backbone = load_backbone(config.model)
    method = get_method(config.method.name)(config, backbone)
    method.setup()
    _, dataset, _ = _build_data(config, accelerator, backbone)
    batch = _Batches(dataset, 2, 0, 0, 1, 1).get(0, 0)
    unet, text = [], []
    backbone.denoiser.register_forward_hook(lambda m, i, o: unet.append(i[0].shape[0]))
    backbone.text_encoders[0].register_forward_hook(lambda m, i, o: text.append(1))
    losses = run_step(config, backbone, method, TextCache(backbone, not method.trains_text), batch, None,
                      torch.Generator().manual_seed(3), "backpack", backward=lambda loss, last: loss.backward() or True)
    grads = {n: p.grad.clone() for n, p in backbone.denoiser.named_parameters() if p.requires_grad}
    text_side = backbone.text_encoders[0].named_parameters()
    grads |= {f"text.{n}": p.grad.clone() for n, p in text_side if p.grad is not None}
    return losses, grads, unet, len(text)


def test_zero_weights_skip_the_extra_work(model, refs, tmp_path):
    # (all weights 0: one UNet forward, test_train.py::test_zero_dd_weight_skips_the_extra_passes)
    sude, _, unet, text = _step(tiny_config(model, refs, tmp_path / "s", accord={"dd_weight": 0.0},
                                            regularizers={"sude_weight": 1.0}))
    assert unet == [2, 4]  # joint with gradient; category + empty in one forward without
    assert text == 3  # captions, category prompts, empty prompt (frozen text: encoded once, then cached)
    assert "classdiffusion" not in sude.parts  # its weight is 0
    assert torch.isfinite(sude.parts["sude"]) and sude.parts["sude"] >= 0
    assert torch.allclose(sude.total.detach(), sude.parts["diffusion"] + sude.parts["sude"])
    cd, _, unet, text_cd = _step(tiny_config(model, refs, tmp_path / "c", accord={"dd_weight": 0.0},
                                             method={"train_text_encoder": True},
                                             regularizers={"classdiffusion_weight": 0.5}))
    assert unet == [2] and "sude" not in cd.parts  # SuDe's weight is 0: no extra UNet pass
    assert text_cd == 3  # captions, then personal phrases (with gradient) and class phrases (without)
    assert 0 <= cd.parts["classdiffusion"] <= 2
    assert torch.allclose(cd.total.detach(), cd.parts["diffusion"] + 0.5 * cd.parts["classdiffusion"])


def test_pdloss_trains_the_trigger_text_features_when_the_text_encoder_is_trained(model, refs, tmp_path):
    """LoRA's c_p is the trigger phrase: frozen text means PDLoss has nothing to train (skipped); with
    method.train_text_encoder it is Eq. 11 on the trained encoder, its gradient on the text side only."""
    off, _, _, _ = _step(tiny_config(model, refs, tmp_path / "f", accord={"dd_weight": 0.0, "pd_weight": 0.5}))
    assert "pd" not in off.parts
    text = {"train_text_encoder": True}
    base, g0, _, _ = _step(tiny_config(model, refs, tmp_path / "b", accord={"dd_weight": 0.0}, method=text))
    pd, g1, _, _ = _step(tiny_config(model, refs, tmp_path / "p", accord={"dd_weight": 0.0, "pd_weight": 0.5},
                                     method=text))
    assert 0 < pd.parts["pd"] <= 2 and "pd" not in base.parts
    assert torch.allclose(pd.total.detach(), pd.parts["diffusion"] + 0.5 * pd.parts["pd"])
    assert torch.allclose(pd.parts["diffusion"], base.parts["diffusion"])
    text_keys = [k for k in g1 if k.startswith("text.")]
    assert text_keys and g0.keys() == g1.keys()
    assert any(not torch.allclose(g0[k], g1[k]) for k in text_keys)  # PDLoss moves the text side
    assert all(torch.equal(g0[k], g1[k]) for k in g1 if not k.startswith("text."))  # and not the UNet


def test_lean_mode_keeps_the_fast_gradient_with_sude(model, refs, tmp_path):
    def run(mode):  # truncation far below any value: SuDe always contributes here
        return _step(tiny_config(model, refs, tmp_path / mode, accord={"dd_weight": 0.3, "mode": mode},
                                 regularizers={"sude_weight": 1.0, "sude_truncation": "fixed",
                                               "sude_tau": -1e9}))

    fast, g_fast, unet_fast, _ = run("fast")
    lean, g_lean, unet_lean, _ = run("lean")
    assert unet_fast == [4, 4, 4] and unet_lean == [6, 2, 4, 2]
    assert fast.parts["sude"] != 0 and torch.allclose(fast.total, lean.total, rtol=1e-5)
    for name in g_fast:
        assert torch.allclose(g_fast[name], g_lean[name], rtol=1e-4, atol=1e-7), name


def test_two_step_run_logs_finite_components(model, refs, tmp_path, capsys):
    from accord.train import train

    config = tiny_config(model, refs, tmp_path / "run", method={"train_text_encoder": True},
                         regularizers={"sude_weight": 0.5, "classdiffusion_weight": 0.1},
                         train={"max_steps": 2})
    train(config, progress=False)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step 2/2")][0]
    logged = {k: float(v) for k, v in re.findall(r"(\w+)=([-+0-9.eEinfa]+)", line)}
    for name in ("loss", "diffusion", "dd", "sude", "classdiffusion"):
        assert name in logged and math.isfinite(logged[name]), (name, line)
