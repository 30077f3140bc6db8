"""DDLoss variants (accord.dd_variant): pinned hand-computed values, where gradient flows, the base model's
anchor, and the trainer's schedules giving each variant the same gradient."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from trainkit import tiny_config

from accord.losses import dd_loss, dd_variant_loss

# Flow grid of 4 steps, shift 1, timestep 2: Eq. 7's k = (m·c_out)²/(2σ̃²) = 1 and t/T = 0.5 (see
# test_losses_unit.py's FLOW_PINNED), so on scale "sum" each variant is 0.5 × its bracket.
SCHED = FlowMatchEulerDiscreteScheduler(num_train_timesteps=4, shift=1.0)
T = torch.tensor([2.0])
# j, p, g, ∅ = [1, 0], [0, 0], [1, 1], [1, 0.5]: J = j−∅ = [0, −0.5], P = [−1, −0.5], G = [0, 0.5];
# ‖J − P − G‖² = ‖[1, −0.5]‖² = 1.25, ⟨P, G⟩ = −0.25, Δ = 1.25 + 0.5 = 1.75.
PREDS = [[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.5]]
# Anchor A (s = [1, 0]): S = [0, −0.5], J_s − S − G_b = [0, −0.5] → Δ_s = 0.25 + 0.5 = 0.75, ⟨S, G_b⟩ = −0.25.
# Anchor B (s = [1, 1]): S = [0, 0.5], J_s − S − G_b = [0, −1.5] → Δ_s = 2.25 − 0.5 = 1.75, ⟨S, G_b⟩ = 0.25.
ANCHOR_A = [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.5]]
ANCHOR_B = [[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.5]]
PINNED = {  # variant -> (anchor, expected)
    "paper": (None, 0.5 * 1.75),
    "frozen_personal": (None, 0.5 * 1.75),
    "composition": (None, 0.5 * 1.25),
    "anchored": (ANCHOR_A, 0.5 * abs(1.75 - 0.75)),
    "alignment": (ANCHOR_B, 0.5 * 2 * abs(-0.25 - 0.25)),
    # j − p = [1, 0]; anchor A's j_s − s = [0, 0]: ‖[1, 0] − [0, 0]‖² = 1
    "conditional": (ANCHOR_A, 0.5 * 1.0),
}


def _tensors(rows, grad=False):
    return [torch.tensor([r], dtype=torch.float64, requires_grad=grad) for r in rows]


def _loss(variant, preds, anchor=None):
    return dd_variant_loss(variant, *preds, sample=torch.zeros(1, 2), timesteps=T, scheduler=SCHED, scale="sum",
                           anchor=None if anchor is None else _tensors(anchor))


@pytest.mark.parametrize("variant", sorted(PINNED))
def test_pinned_values(variant):
    anchor, expected = PINNED[variant]
    per, comps = _loss(variant, _tensors(PREDS), anchor)
    assert per.shape == (1,) and per.item() == pytest.approx(expected, rel=1e-6)
    assert comps["dependence_shift"].item() == pytest.approx(1.75, rel=1e-6)  # Eq. 7's Δ is logged for all
    assert comps["dd"].item() == pytest.approx(expected, rel=1e-6)


def test_the_other_anchor_zeroes_each_anchored_variant():
    """Anchor B has the same Δ as c_p (anchored: 0); anchor A the same ⟨·, G⟩ (alignment: 0)."""
    assert _loss("anchored", _tensors(PREDS), ANCHOR_B)[0].item() == pytest.approx(0, abs=1e-12)
    assert _loss("alignment", _tensors(PREDS), ANCHOR_A)[0].item() == pytest.approx(0, abs=1e-12)
    assert _loss("anchored", _tensors(PREDS), ANCHOR_A)[1]["anchor_shift"].item() == pytest.approx(0.75)
    # conditional is 0 when c_g changes the step given c_p exactly as it does given c_s (j_s − s = j − p = [1, 0]),
    # whatever the single-concept steps are; anchor B's j_s − s = [0, −1] gives ‖[1, 1]‖² = 2
    shifted = [[3.0, 2.0], [2.0, 2.0], [5.0, 5.0], [4.0, 4.0]]
    assert _loss("conditional", _tensors(PREDS), shifted)[0].item() == pytest.approx(0, abs=1e-12)
    only_two = _tensors(shifted[:2]) + [None, None]  # what the trainer passes: U_js and U_s
    assert dd_variant_loss("conditional", *_tensors(PREDS), sample=torch.zeros(1, 2), timesteps=T, scheduler=SCHED,
                           scale="sum", anchor=only_two)[0].item() == pytest.approx(0, abs=1e-12)
    assert _loss("conditional", _tensors(PREDS), ANCHOR_B)[0].item() == pytest.approx(0.5 * 2.0)


def test_conditional_penalises_a_trigger_that_learned_the_general_concept():
    """At the base model the superclass's step with c_g differs from its step alone by G's direction; a trigger
    whose own step already holds it (P = J) leaves j − p = 0, which conditional penalises by ‖G‖² (Eq. 8: 0)."""
    j, g, n = [0.0, 1.0], [0.0, 2.0], [0.0, 0.0]
    anchor = [[0.0, 2.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0]]  # the superclass adds nothing; c_g adds [0, 2]
    preds = _tensors([j, j, g, n])
    assert _loss("paper", preds)[0].item() == pytest.approx(0, abs=1e-12)
    assert _loss("conditional", preds, anchor)[0].item() == pytest.approx(0.5 * 4.0)


def test_paper_is_eq8():
    preds = [torch.randn(3, 4, 2, 2) for _ in range(4)]
    t = torch.tensor([1.0, 2.0, 3.0])
    a = dd_variant_loss("paper", *preds, sample=preds[0], timesteps=t, scheduler=SCHED)[0]
    b = dd_loss(*preds, sample=preds[0], timesteps=t, scheduler=SCHED)[0]
    torch.testing.assert_close(a, b)


def _grads(variant, anchor=None):
    preds = _tensors(PREDS, grad=True)
    anchor_t = None if anchor is None else _tensors(anchor, grad=True)
    per, _ = dd_variant_loss(variant, *preds, sample=torch.zeros(1, 2), timesteps=T, scheduler=SCHED, scale="sum",
                             anchor=anchor_t)
    per.sum().backward()
    return [p.grad for p in preds], [] if anchor_t is None else [a.grad for a in anchor_t]


@pytest.mark.parametrize("variant", sorted(PINNED))
def test_gradient_reaches_joint_and_personal_only(variant):
    (gj, gp, gg, gn), anchor_grads = _grads(variant, PINNED[variant][0])  # anchors where the value is not 0
    assert gg is None and gn is None and all(g is None for g in anchor_grads)  # stop-gradient on c_g, ∅, anchor
    if variant == "frozen_personal":
        assert gp is None and gj.abs().sum() > 0
    elif variant == "alignment":  # ⟨P, G⟩ does not involve the joint
        assert gp.abs().sum() > 0 and (gj is None or gj.abs().sum() == 0)
    else:
        assert gj.abs().sum() > 0 and gp.abs().sum() > 0


def test_frozen_personal_keeps_eq8s_joint_gradient():
    (gj_paper, *_), _ = _grads("paper")
    (gj_frozen, *_), _ = _grads("frozen_personal")
    torch.testing.assert_close(gj_paper, gj_frozen)


def test_composition_gradient_pushes_personal_off_the_general_direction():
    """A trigger whose step equals the whole joint step (P = J, 'learned the scene') is penalised by composition
    (J − P − G = −G ≠ 0), while Eq. 8 at the same point has Δ = ‖G‖² − 2⟨J, G⟩, here 0: no penalty at all."""
    j, g, n = [0.0, 1.0], [0.0, 2.0], [0.0, 0.0]  # J = P = [0, 1], G = [0, 2]: ‖G‖² − 2⟨J, G⟩ = 4 − 4 = 0
    preds = _tensors([j, j, g, n])
    assert _loss("paper", preds)[0].item() == pytest.approx(0, abs=1e-12)
    assert _loss("composition", preds)[0].item() == pytest.approx(0.5 * 4.0)


def test_unknown_variant_and_missing_anchor_say_what_to_do():
    with pytest.raises(ValueError, match="paper, anchored"):
        _loss("nope", _tensors(PREDS))
    with pytest.raises(ValueError, match="needs the superclass anchor"):
        _loss("anchored", _tensors(PREDS))


# ---------------------------------------------------------------------------- in the trainer


def test_base_model_switches_lora_off(tiny_model_dir, refs, tmp_path):
    from accelerate import Accelerator

    from accord.train import build_model

    backbone, method = build_model(tiny_config(tiny_model_dir("sd"), refs, tmp_path / "b"), Accelerator(cpu=True))
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    cond = backbone.encode_prompts(["1 sks backpack"])
    with torch.no_grad():
        before = backbone.predict(x, t, cond)
        for name, p in backbone.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # the adapters now change the prediction
        tuned = backbone.predict(x, t, cond)
        with method.base_model():
            base = backbone.predict(x, t, cond)
        after = backbone.predict(x, t, cond)
    assert (tuned - before).abs().max() > 1e-3
    torch.testing.assert_close(base, before)
    torch.testing.assert_close(after, tuned)
    assert all(p.requires_grad for n, p in backbone.denoiser.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("frozen", [True, False])
def test_dreambooth_anchor_is_a_frozen_copy_of_the_base_unless_told_otherwise(frozen, tiny_model_dir, refs, tmp_path):
    from accelerate import Accelerator

    from accord.train import build_model

    config = tiny_config(tiny_model_dir("sd"), refs, tmp_path / "d", method={"name": "dreambooth",
                         "frozen_anchor": frozen}, accord={"dd_weight": 0.2, "dd_variant": "conditional"})
    backbone, method = build_model(config, Accelerator(cpu=True))
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    cond = backbone.encode_prompts(["1 sks backpack"])
    with torch.no_grad():
        before = backbone.predict(x, t, cond)
        for p in backbone.denoiser.parameters():
            p.mul_(1.1)  # a training step's change, in place
        tuned = backbone.predict(x, t, cond)
        with method.base_model():
            base = backbone.predict(x, t, cond)
        after = backbone.predict(x, t, cond)
    assert (tuned - before).abs().max() > 1e-3
    torch.testing.assert_close(base, before if frozen else tuned)
    torch.testing.assert_close(after, tuned)
    assert all(p.requires_grad for p in backbone.denoiser.parameters())
    _, plain = build_model(tiny_config(tiny_model_dir("sd"), refs, tmp_path / "p", method={"name": "dreambooth"},
                                       accord={"dd_weight": 0.2}), Accelerator(cpu=True))
    assert plain._anchor is None  # no copy for a form that reads no anchor


def _step(config, spy: dict | None = None):
    from accord.backbones import load_backbone
    from accord.methods import get_method
    from accord.step import TextCache, run_step
    from accord.train import _Batches, _build_data

    torch.manual_seed(0)
    backbone = load_backbone(config.model)
    method = get_method("lora")(config, backbone)
    method.setup()
    with torch.no_grad():  # LoRA away from its zero start, so the base anchor differs from the current model
        for name, p in backbone.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    _, dataset, _ = _build_data(config, None, backbone)
    batch = _Batches(dataset, 2, 0, 0, 1, 1).get(0, 0)
    calls = []
    backbone.denoiser.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    losses = run_step(config, backbone, method, TextCache(backbone, True), batch, None,
                      torch.Generator().manual_seed(3), "backpack", backward=lambda loss, last: loss.backward() or True)
    grads = {n: p.grad.clone() for n, p in backbone.denoiser.named_parameters() if p.requires_grad}
    if spy is not None:
        spy["backbone"] = backbone
    return losses, grads, calls


@pytest.mark.parametrize("variant", ["anchored", "composition", "frozen_personal", "conditional"])
def test_lean_gives_the_fast_gradient_for_each_variant(variant, tiny_model_dir, refs, tmp_path):
    model = tiny_model_dir("sd")
    fast, g_fast, calls_fast = _step(tiny_config(model, refs, tmp_path / "f",
                                                 accord={"dd_weight": 0.3, "dd_variant": variant}))
    lean, g_lean, calls_lean = _step(tiny_config(model, refs, tmp_path / "l",
                                                 accord={"dd_weight": 0.3, "dd_variant": variant, "mode": "lean"}))
    # 2 rows × (joint_s, s, g, ∅) through the base, no gradient; conditional reads (joint_s, s) only
    anchor = {"anchored": [8], "conditional": [4]}.get(variant, [])
    if variant == "frozen_personal":  # its own schedule in both modes: (c_p, c_g, ∅) without gradient, the joint with
        assert calls_fast == calls_lean == [6, 2]
    else:
        assert calls_fast == [4, *anchor, 4] and calls_lean == [*anchor, 6, 2, 2]
    assert fast.parts["dd"] > 0 and torch.allclose(fast.total, lean.total, rtol=1e-5)
    if variant == "anchored":
        assert "anchor_shift" in fast.parts
    for name in g_fast:
        assert torch.allclose(g_fast[name], g_lean[name], rtol=1e-4, atol=1e-7), name
    plain, g_plain, _ = _step(tiny_config(model, refs, tmp_path / "p", accord={"dd_weight": 0.3}))
    if variant == "frozen_personal":  # Eq. 8's value without its c_p path
        assert fast.parts["dd"] == pytest.approx(float(plain.parts["dd"]), rel=1e-5)
    else:
        assert abs(fast.parts["dd"] - plain.parts["dd"]) > 1e-3 * plain.parts["dd"]
    if variant != "anchored":  # |Δ − c| has |Δ|'s gradient wherever Δ and Δ − c share a sign, as at this draw
        assert any(not torch.allclose(g_fast[n], g_plain[n], rtol=1e-3, atol=1e-9) for n in g_fast)


@pytest.mark.parametrize("variant", ["paper", "conditional"])
def test_a_general_the_caption_does_not_name_gets_its_own_joint(variant, tiny_model_dir, tmp_path, monkeypatch):
    """Template captions with an explicit ``general`` in metadata.jsonl: Eq. 7's joint is the prediction given
    "c_p, c_g", not the caption's (which holds c_p alone), in both schedules, with the same gradient."""
    import json

    from trainkit import make_refs

    import accord.step as step_module

    refs = make_refs(tmp_path / "refs", captions=["1 sks backpack"] * 4)
    (refs / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i:02d}.jpg", "general": ["girl", "park"]})
                                                 + "\n" for i in range(4)))
    real, seen = step_module.dd_variant_loss, []

    def spy(variant, joint, *args, **kwargs):
        seen.append({"joint": joint.detach().clone(), "x": kwargs["sample"], "t": kwargs["timesteps"]})
        return real(variant, joint, *args, **kwargs)

    monkeypatch.setattr(step_module, "dd_variant_loss", spy)
    model, runs = tiny_model_dir("sd"), {}
    for mode in ("fast", "lean"):
        keep: dict = {}
        config = tiny_config(model, refs, tmp_path / mode, accord={"dd_weight": 0.3, "dd_variant": variant,
                                                                   "mode": mode})
        runs[mode] = (*_step(config, keep), keep["backbone"])
    losses, grads, calls, backbone = runs["fast"]
    anchor = [4] if variant == "conditional" else []  # 2 rows × (joint_s, s) through the base
    assert calls == [6, *anchor, 4]  # 2 captions, 2 own joints, 2 c_p with gradient; (c_g, ∅) without
    with torch.no_grad():
        for record in seen:
            x, t, k = record["x"], record["t"], len(record["x"])
            wanted = backbone.predict(x, t, backbone.encode_prompts(["1 sks backpack, girl, park"] * k))
            caption_only = backbone.predict(x, t, backbone.encode_prompts(["1 sks backpack"] * k))
            torch.testing.assert_close(record["joint"], wanted, rtol=1e-4, atol=1e-5)
            assert (record["joint"] - caption_only).abs().max() > 1e-3
    assert torch.allclose(losses.total, runs["lean"][0].total, rtol=1e-5)
    for name in grads:
        assert torch.allclose(grads[name], runs["lean"][1][name], rtol=1e-4, atol=1e-7), name


def test_a_caption_names_its_general_when_it_holds_every_word():
    from accord.step import names_general

    assert names_general("1 sks backpack, girl, park", "park, girl")
    assert names_general("a photo of <asset0> and <asset1>, table", "a photo of <asset1>, table")  # Break-A-Scene
    assert names_general("sks dog at the Park", "park")
    assert not names_general("1 sks backpack", "girl, park")
    assert not names_general("1 sks backpack, girl", "girl, park")
