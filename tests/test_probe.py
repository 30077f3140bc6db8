"""`accord probe` and the live Eq. 7 terms: the probe runs on every backbone, its numbers are the trainer's at the same
x_t and t, the gradient shares agree between the fast and lean schedules, and the two warnings fire when built to."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from trainkit import tiny_config

from accord.monitor import TermsMonitor


def _check_point(p: dict) -> None:
    for name in ("eq7_personal", "eq7_general", "eq7_null", "eq7_shift", "eq7_additivity", "eq7_alignment", "share_dd"):
        assert name in p and math.isfinite(p[name]), (name, p)
    # Eq. 7 is the signed sum of its terms, and additivity − alignment (the decomposition) equals it too
    scale = max(abs(p["eq7_null"]), 1e-30)
    assert abs(p["eq7_personal"] + p["eq7_general"] - p["eq7_null"] - p["eq7_shift"]) <= 1e-4 * scale
    assert abs(p["eq7_additivity"] - p["eq7_alignment"] - p["eq7_shift"]) <= 1e-4 * scale
    assert p["eq7_personal"] >= 0 and p["eq7_additivity"] >= 0 and p["share_dd"] > 0


@pytest.mark.parametrize("kind", ["sd", "sdxl", "flux", "sd3"])
def test_probe_runs_on_every_backbone(kind, tiny_model_dir, refs, tmp_path):
    from accord.probe import probe

    config = tiny_config(tiny_model_dir(kind), refs, tmp_path / "o", accord={"pd_weight": 0.0})
    result = probe(config, num_timesteps=3, max_captions=2)
    assert len(result["captions"]) == 2 and len(result["timesteps"]) == 3
    assert sorted(result["timesteps"]) == result["timesteps"] and result["timesteps"][0] > 0
    for caption in result["captions"]:
        assert [p["t"] for p in caption["points"]] == result["timesteps"]
        for p in caption["points"]:
            _check_point(p)
        assert set(caption["bands"]) == {"t<300", "300-700", "t>700"}


def test_probe_command_writes_table_json_and_html(tiny_model_dir, refs, tmp_path, capsys):
    import yaml

    from accord.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"pretrained": str(tiny_model_dir("sd"))},
                                   "data": {"instance_dir": str(refs), "class_noun": "backpack", "resolution": 32},
                                   "method": {"name": "lora", "lora_rank": 4}, "accord": {"dd_weight": 0.2},
                                   "train": {"output_dir": str(tmp_path / "run")}}))
    assert main(["probe", str(cfg), "--timesteps", "3", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "|Uj-Up|2" in out and "(all captions)" in out and "share_dd" in out
    assert "no other concept (c_g)" in out  # the fourth reference's caption is the trigger phrase alone
    data = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert len(data["captions"]) == 4 and data["dd_scale"] == "reference"
    page = (tmp_path / "p" / "probe.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "alignment" in page
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.safetensors"))  # nothing trained


def test_probe_equals_the_trainers_logged_terms(tiny_model_dir, refs, tmp_path):
    """Train one step and log it; the probe's function on that step's batch and generator gives the same numbers."""
    from accelerate import Accelerator

    from accord.probe import probe_batch
    from accord.step import TextCache
    from accord.train import _Batches, _build_data, _step_generator, build_model, train

    config = tiny_config(tiny_model_dir("sd"), refs, tmp_path / "run",
                         accord={"dd_weight": 0.2, "grad_share_every": 1}, train={"max_steps": 1, "log_every": 1})
    out = train(config, progress=False)
    logged = json.loads((out / "train_summary.json").read_text())["eq7"]
    assert [p["step"] for p in logged] == [1]

    accelerator = Accelerator(cpu=True)
    backbone, method = build_model(config, accelerator)
    _, dataset, _ = _build_data(config, accelerator, backbone, method)
    batch = _Batches(dataset, config.train.batch_size, config.train.seed, 0, 1, 1).get(0, 0)
    torch.manual_seed(config.train.seed * 7919)  # the loop's global seed at step 0
    probed = probe_batch(config, backbone, method, TextCache(backbone, True), batch,
                         _step_generator(config.train.seed, 0, 0, 0), accelerator)
    for name, value in logged[0].items():
        if name != "step":
            assert probed[name] == pytest.approx(value, rel=1e-5), name
    assert {"eq7_shift", "share_dd"} <= set(logged[0])


def _shares(model, refs, tmp_path, mode, **accord):
    from accelerate import Accelerator

    from accord.step import TextCache, run_step
    from accord.train import _Batches, _build_data, build_model

    config = tiny_config(model, refs, tmp_path / mode, accord={"dd_weight": 0.3, "mode": mode, **accord},
                         regularizers={"sude_weight": 0.4})
    config.regularizers.sude_truncation, config.regularizers.sude_tau = "fixed", -1e9  # SuDe always active
    accelerator = Accelerator(cpu=True)
    backbone, method = build_model(config, accelerator)
    _, dataset, _ = _build_data(config, accelerator, backbone, method)
    batch = _Batches(dataset, 2, 0, 0, 1, 1).get(0, 0)
    losses = run_step(config, backbone, method, TextCache(backbone, True), batch, None,
                      torch.Generator().manual_seed(3), "backpack", backward=None, measure_share=True)
    grads = [p.grad for p in method.parameters()]
    return {k: float(v) for k, v in losses.parts.items() if k.startswith("share_")}, grads


def test_gradient_shares_agree_between_fast_and_lean(tiny_model_dir, refs, tmp_path):
    model = tiny_model_dir("sd")
    fast, fast_grads = _shares(model, refs, tmp_path, "fast")
    lean, _ = _shares(model, refs, tmp_path, "lean")
    assert set(fast) == set(lean) == {"share_dd", "share_sude"}
    for name in fast:
        assert lean[name] == pytest.approx(fast[name], rel=1e-4), name
    assert all(g is None for g in fast_grads)  # measuring leaves .grad alone (and no backward was asked for)
    # the share scales with the weight: the same step at 10x the DD weight has 10x the share
    ten, _ = _shares(model, refs, tmp_path / "x10", "fast", dd_weight=3.0)
    assert ten["share_dd"] == pytest.approx(10 * fast["share_dd"], rel=1e-4)


# ---------------------------------------------------------------------------- warnings


def _monitor():
    said = []
    return TermsMonitor(0.2, "reference", warn=lambda msg, *a: said.append(msg % a)), said


def test_inert_warning_after_three_low_shares_once():
    monitor, said = _monitor()
    for step, share in enumerate([0.5, 0.004, 0.003, 0.002, 0.001]):
        monitor.add(step, {"share_dd": share})
    assert len(said) == 1 and "inert" in said[0] and "at step 4)" in said[0]  # the third low one
    monitor.finish()
    assert len(said) == 1


def test_inert_warning_for_a_short_run_and_not_for_an_active_one():
    monitor, said = _monitor()
    monitor.add(0, {"share_dd": 0.001})
    monitor.finish()
    assert len(said) == 1 and "0.1%" in said[0]
    monitor, said = _monitor()
    for step in range(6):
        monitor.add(step, {"share_dd": 0.005 if step % 2 else 0.05})
    monitor.finish()
    assert said == []


def test_falling_personal_term_warns_once_with_dd_on_only():
    series = [1.0, 0.9, 0.8, 0.45, 0.3, 0.2]
    monitor, said = _monitor()
    for step, value in enumerate(series):
        monitor.add(step, {"eq7_personal": value})
        monitor.close_window(step + 1)
    assert len(said) == 1 and "fell from 1 " in said[0] and "to step 4" in said[0]
    assert [p["eq7_personal"] for p in monitor.trajectory] == series
    off = TermsMonitor(0.0, "reference", warn=lambda *a: said.append(a))
    for step, value in enumerate(series):
        off.add(step, {"eq7_personal": value})
        off.close_window(step + 1)
    assert len(said) == 1
    for variant, warns in [("anchored", True), ("conditional", False), ("composition", False)]:
        heard = []
        form = TermsMonitor(0.2, "reference", warn=lambda *a, heard=heard: heard.append(a), dd_variant=variant)
        for step, value in enumerate(series):
            form.add(step, {"eq7_personal": value})
            form.close_window(step + 1)
        assert len(heard) == int(warns), variant  # only the |Δ| forms reward the fall the warning reads


def test_monitor_state_round_trips_through_json():
    monitor, said = _monitor()
    monitor.add(0, {"eq7_personal": 1.0, "share_dd": 0.001})
    monitor.close_window(1)
    monitor.add(1, {"eq7_personal": 0.8})
    resumed, said2 = _monitor()
    resumed.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    for m in (monitor, resumed):
        m.add(2, {"eq7_personal": 0.1, "share_dd": 0.002})
        m.close_window(3)
        m.add(3, {"share_dd": 0.001})
    assert monitor.trajectory == resumed.trajectory and said == said2 and len(said) == 2


def test_inert_warning_fires_in_a_training_run(tiny_model_dir, refs, tmp_path, caplog):
    from accord.train import train

    config = tiny_config(tiny_model_dir("sd"), refs, tmp_path / "run",
                         accord={"dd_weight": 1e-7, "grad_share_every": 1}, train={"max_steps": 3, "log_every": 1})
    with caplog.at_level(logging.WARNING, logger="accord.train"):
        out = train(config, progress=False)
    assert sum("DDLoss is inert at accord.dd_weight=1e-07" in r.getMessage() for r in caplog.records) == 1
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["warnings"] == ["inert"] and [p["step"] for p in summary["eq7"]] == [1, 2, 3]
    assert all(p["share_dd"] < 0.01 for p in summary["eq7"])
