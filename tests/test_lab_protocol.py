"""The lab's protocol v2 (accord.lab.protocol): per-step summaries, leak-vs-fidelity curves, matched-fidelity and
best-step comparison with intervals on the relative leak change (hand-computed values), the CLI's checks, and a
2-step bench that resumes where it stopped."""

from __future__ import annotations

import json

import pytest

from accord.lab import protocol as P


def _eval(method, reg, seed, step, leak, text=0.5, fidelity=0.5):
    """One (run, step) record whose per-seed means are exactly the given values."""
    row = {"leak": leak, "text": text, "fidelity": fidelity, "clip_t": 0.0, "clip_i": 0.0, "asks_coupled": False,
           "category": "c"}
    control = {**row, "leak": 1.0, "asks_coupled": True}  # left out of the leak rate
    return {"protocol": 2, "name": f"{method}-{reg}-s{seed}", "step": step,
            "setting": {"method": method, "regularizer": reg, "seed": seed, "task": "t"},
            "rows": [row, {**control, "text": text, "fidelity": fidelity}]}


def test_summarize_steps_gives_mean_and_t_interval_per_method_regularizer_step():
    evals = [_eval("lora", "none", 0, 2, 0.2), _eval("lora", "none", 1, 2, 0.4), _eval("lora", "none", 0, 1, 0.1),
             _eval("lora", "none", 1, 1, 0.1), _eval("lora", "dd", 0, 1, 0.3)]
    rows = P.summarize_steps(evals)
    assert [(r["regularizer"], r["step"], r["seeds"]) for r in rows] == [("none", 1, 2), ("none", 2, 2), ("dd", 1, 1)]
    mean, half = rows[1]["leak"]
    # sd of (0.2, 0.4) = 0.1414; t(1) = 12.706; half = 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert mean == pytest.approx(0.3) and half == pytest.approx(1.2706, abs=1e-4)
    assert rows[0]["leak"] == pytest.approx((0.1, 0.0))
    assert rows[1]["per_seed"]["leak"] == {0: 0.2, 1: 0.4}


def test_curves_are_per_method_and_regularizer_ordered_by_step():
    rows = [{"method": "lora", "regularizer": "dd", "step": 300, "fidelity": (0.8, 0.1), "leak": (0.3, 0.05)},
            {"method": "lora", "regularizer": "dd", "step": 150, "fidelity": (0.6, 0.1), "leak": (0.2, 0.05)},
            {"method": "lora", "regularizer": "none", "step": 150, "fidelity": (0.7, 0.0), "leak": (0.4, 0.0)}]
    assert P.curves(rows) == {"lora": {"dd": [(150, 0.6, 0.1, 0.2, 0.05), (300, 0.8, 0.1, 0.3, 0.05)],
                                       "none": [(150, 0.7, 0.0, 0.4, 0.0)]}}


def _rows(*pairs):
    return [{"step": s, "fidelity": (f, 0.0), "text": (t, 0.0), "leak": (0.0, 0.0)} for s, f, t in pairs]


def test_match_step_takes_the_closest_fidelity_within_five_points_or_none():
    rows = _rows((1, 0.70, 0), (2, 0.78, 0), (3, 0.83, 0))
    assert P.match_step(rows, 0.80)["step"] == 2  # 2 points off, closer than step 3's 3
    assert P.match_step(rows, 0.88)["step"] == 3  # exactly 5 points: still a match
    assert P.match_step(rows, 0.89) is None  # 6 points from the closest
    assert P.match_step(_rows((1, 0.78, 0), (2, 0.82, 0)), 0.80)["step"] == 1  # a tie: the earlier step


def test_best_step_maximises_the_mean_of_text_accuracy_and_fidelity():
    rows = _rows((1, 0.5, 0.9), (2, 0.9, 0.6), (3, 0.7, 0.8))  # 0.70, 0.75, 0.75
    assert P.best_step(rows)["step"] == 2
    assert P.BEST_STEP({"text": 0.6, "fidelity": 0.9, "leak": 1.0}) == pytest.approx(0.75)  # leak plays no part


def test_relative_change_is_a_paired_t_interval_over_the_baselines_mean():
    # differences -0.3, -0.4: mean -0.35, sd 0.0707, half 12.706 * 0.0707 / sqrt(2) = 0.6353; baseline mean 0.5
    rel, low, high, n = P.relative_change({0: 0.4, 1: 0.6, 9: 0.0}, {0: 0.1, 1: 0.2, 7: 0.9})  # 7, 9: no pair
    assert n == 2 and rel == pytest.approx(-0.7)
    assert low == pytest.approx((-0.35 - 0.6353) / 0.5, abs=1e-3) and high == pytest.approx((-0.35 + 0.6353) / 0.5,
                                                                                              abs=1e-3)
    assert P.relative_change({0: 0.4, 1: 0.5, 2: 0.6}, {0: 0.1, 1: 0.2, 2: 0.3})[:3] == pytest.approx((-0.6,) * 3)
    rel, low, _, n = P.relative_change({0: 0.0, 1: 0.0}, {0: 0.1, 1: 0.2})
    assert n == 2 and rel != rel and low != low  # no relative change from a zero baseline


def _bench():
    """lora: none at steps 1, 2 (fidelity 0.6, 0.8); dd at 1, 2 (0.79, 0.9); pd never near the baseline's 0.8."""
    evals = []
    for seed, (n1, n2, d1, d2) in enumerate([(0.5, 0.5, 0.2, 0.3), (0.5, 0.6, 0.2, 0.3), (0.5, 0.7, 0.3, 0.3)]):
        evals += [_eval("lora", "none", seed, 1, n1, fidelity=0.6), _eval("lora", "none", seed, 2, n2, fidelity=0.8),
                  _eval("lora", "dd", seed, 1, d1, fidelity=0.79), _eval("lora", "dd", seed, 2, d2, fidelity=0.9),
                  _eval("lora", "pd", seed, 1, 0.1, fidelity=0.6), _eval("lora", "pd", seed, 2, 0.1, fidelity=0.65)]
    return evals


def test_compare_at_matched_fidelity_and_at_the_best_steps():
    rows = {(r["regularizer"], r["rule"].split()[0]): r for r in P.compare(P.summarize_steps(_bench()))}
    dd = rows[("dd", "matched")]
    assert (dd["base_step"], dd["step"]) == (2, 1)  # none at its last step (0.8) against dd's 0.79
    # dd@1 - none@2 per seed: -0.3, -0.4, -0.4 → mean -0.3667 over none's 0.6; half 4.303 * 0.0577 / sqrt(3) = 0.1434
    rel, low, high, n = dd["change"]
    assert n == 3 and rel == pytest.approx(-0.3667 / 0.6, abs=1e-3)
    assert high == pytest.approx((-0.3667 + 0.1434) / 0.6, abs=1e-3) and high < 0
    assert dd["meets"] == "yes"
    assert rows[("pd", "matched")]["meets"] == "no match" and rows[("pd", "matched")]["step"] is None
    # best step (0.5 text + 0.5 fidelity, text equal): none at 2 (0.8), dd at 2 (0.9): 10 points apart, no match
    best = rows[("dd", "best")]
    assert (best["base_step"], best["step"], best["meets"]) == (2, 2, "no match")
    # against an earlier reference step (0.6): pd at step 1 matches, its leak 0.1 vs 0.5: -80%, interval (-80, -80)
    pd = {r["regularizer"]: r for r in P.compare(P.summarize_steps(_bench()), reference_step=1)
          if r["rule"].startswith("matched")}["pd"]
    assert (pd["step"], pd["meets"]) == (1, "yes") and pd["change"][0] == pytest.approx(-0.8)


def test_meets_needs_half_the_leak_gone_and_an_interval_excluding_zero():
    assert P._meets((-0.5, -0.7, -0.3, 5), True) == "yes"
    assert P._meets((-0.4, -0.7, -0.1, 5), True) == "no"  # not half
    assert P._meets((-0.6, -1.5, 0.1, 5), True) == "no"  # interval reaches no effect
    assert P._meets((-0.6, -0.7, -0.5, 5), False) == "no match"


def test_report_v2_writes_tables_and_embeds_the_curves(tmp_path):
    P.write_report_v2(tmp_path, _bench(), title="t", intro="i")
    summary = (tmp_path / "summary.md").read_text()
    assert "| lora | dd | 1 | 3 |" in summary and "Matched fidelity" in summary
    assert "| lora | dd | matched fidelity | 2 | 80.0 ± 0.0% |" in summary and "| yes |" in summary
    assert "| lora | pd | matched fidelity | 2 | 80.0 ± 0.0% | " in summary and "no match" in summary
    assert "<img src='curve-lora.png'>" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "curve-lora.png").stat().st_size > 1000


def test_quick_prompts_keep_one_counted_prompt_per_category_and_a_control():
    from accord.lab.task import default_task

    t = default_task()
    quick = P.quick_prompts(t)
    counted = [p for p in quick if not p.asks_coupled]
    assert sorted(p.category for p in counted) == sorted({p.category for p in t.prompts if not p.asks_coupled})
    assert sum(p.asks_coupled for p in quick) == 1 and len(quick) < len(t.prompts)


@pytest.mark.parametrize("argv, message", [
    (["--eval-at", "a,b"], "--eval-at 'a,b': give positive step numbers"),
    (["--eval-at", "100,700", "--steps", "600"], "steps beyond --steps 600"),
    (["--reference-step", "7"], "--reference-step 7: choose one of the --eval-at steps"),
    (["--steps", "151"], "--steps 151: without --eval-at protocol 2 evaluates the half and end of --steps"),
    (["--quick", "--steps", "150"], "--steps 150: without --eval-at protocol 2 evaluates the quarters of --steps"),
])
def test_bench_v2_refuses_bad_steps_in_one_line(capsys, argv, message):
    from accord.cli import main

    assert main(["lab", "bench", "--protocol", "2", "--methods", "lora", "--output", "unused", *argv]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_protocol_2_options_need_protocol_2(capsys):
    from accord.cli import main

    assert main(["lab", "bench", "--quick", "--methods", "lora", "--output", "unused"]) != 0
    assert "--quick applies only to --protocol 2" in capsys.readouterr().err


@pytest.mark.slow  # three 2-step lab benches: about 25 s on idle cores, minutes under load
def test_bench_v2_resumes_where_it_stopped(tmp_path, monkeypatch):
    """2 steps evaluated at 1 and 2: a bench stopped after its first evaluation re-runs only what is missing."""
    import accord.train
    from accord.cli import main
    from accord.lab import runner
    from accord.lab.judge import weights_dir

    try:
        weights = weights_dir()
    except Exception as exc:  # noqa: BLE001 - no shipped weights: nothing to run
        pytest.skip(str(exc))
    calls = {"eval": [], "train": []}
    real_eval, real_train = runner.evaluate, accord.train.train

    def spy_eval(pipe, s, *a, **k):
        calls["eval"].append(s.name)
        if calls.get("stop") == len(calls["eval"]):
            raise KeyboardInterrupt  # killed during this evaluation
        return real_eval(pipe, s, *a, **k)

    def spy_train(config, resume=None, **k):
        calls["train"].append(resume)
        return real_train(config, resume=resume, **k)

    monkeypatch.setattr(runner, "evaluate", spy_eval)
    monkeypatch.setattr(accord.train, "train", spy_train)
    out = tmp_path / "v2"
    argv = ["lab", "bench", "--protocol", "2", "--quick", "--methods", "lora", "--regularizers", "none", "dd",
            "--seeds", "1", "--steps", "2", "--eval-at", "1,2", "--images", "1", "--sample-steps", "1",
            "--weights", str(weights), "--output", str(out), "--no-progress", "--jobs", "1"]  # spies: one process
    run = out / "runs-v2" / "lora-none-s0"
    calls["stop"] = 2
    assert main(argv) == 130  # interrupted
    assert (run / "eval-step-1.json").is_file() and not (run / "eval-step-2.json").exists()
    first = (run / "eval-step-1.json").read_text()
    import shutil

    shutil.rmtree(P._checkpoints(run)[2])  # as if killed before step 2's checkpoint: training must resume
    for final in run.glob("*.safetensors"):  # ... and before the final weights
        final.unlink()
    calls.update(eval=[], train=[], stop=None)
    assert main(argv) == 0
    assert calls["train"] == ["latest", None]  # lora-none resumes from step 1; lora-dd trains from the start
    assert calls["eval"] == ["lora-none-s0", "lora-dd-s0", "lora-dd-s0"]  # step 1 of lora-none is not redone
    assert (run / "eval-step-1.json").read_text() == first
    assert json.loads((run / "eval-step-2.json").read_text())["step"] == 2
    calls.update(eval=[], train=[])
    (run / "eval-step-2.json").unlink()  # a lost result of the last step: evaluated again from the final weights
    assert main(argv) == 0
    assert calls == {"eval": ["lora-none-s0"], "train": [], "stop": None}
    page = (out / "report.html").read_text()
    assert "curve-lora.png" in page and "samples-lora-dd-s0.png" in page and (out / "samples-lora-dd-s0.png").is_file()
    assert "| lora | dd | 2 | 1 |" in (out / "summary.md").read_text()


def test_bench_v2_runs_settings_in_parallel_processes(tmp_path):
    """--jobs 2: each setting trained and evaluated in a worker process; the records and the report are whole."""
    from accord.cli import main
    from accord.lab.judge import weights_dir

    try:
        weights = weights_dir()
    except Exception as exc:  # noqa: BLE001 - no shipped weights: nothing to run
        pytest.skip(str(exc))
    out = tmp_path / "v2"
    argv = ["lab", "bench", "--protocol", "2", "--quick", "--methods", "lora", "--regularizers", "none", "dd",
            "--seeds", "1", "--steps", "2", "--eval-at", "1,2", "--images", "1", "--sample-steps", "1",
            "--weights", str(weights), "--output", str(out), "--no-progress", "--task", "object-object-generic",
            "--jobs", "2"]
    assert main(argv) == 0
    for name in ("lora-none-s0", "lora-dd-s0"):
        for step in (1, 2):
            record = json.loads(P.eval_file(out / "runs-v2" / name, step).read_text())
            assert record["name"] == name and record["step"] == step and record["rows"]
    evals = json.loads((out / "evals.json").read_text())
    assert [(e["name"], e["step"]) for e in evals] == [("lora-none-s0", 1), ("lora-none-s0", 2), ("lora-dd-s0", 1),
                                                       ("lora-dd-s0", 2)]
    assert sorted(p.name for p in (out / "references" / "lora").iterdir()) == [
        f"{i:02d}.{ext}" for i in range(5) for ext in ("png", "txt")]  # written whole by both workers, no leftovers
    assert main([*argv[:-1], "1"]) == 0  # everything on disk: nothing is run again, whatever --jobs says


def test_workers_are_handed_the_regularized_runs_first():
    """A regularized run costs more than its baseline; handed out last, it would leave the other worker idle."""
    from accord.lab.experiment import longest_first
    from accord.lab.runner import Setting

    settings = [Setting(regularizer=r, seed=k) for k in (0, 1) for r in ("none", "dd-conditional")]
    assert [settings[i].name for i in longest_first(settings)] == [
        "lora-dd-conditional-s0", "lora-dd-conditional-s1", "lora-none-s0", "lora-none-s1"]
    assert sorted(longest_first(settings)) == list(range(len(settings)))  # every run, once


def test_a_folder_resumes_only_the_same_settings(tmp_path):
    from accord.errors import AccordError
    from accord.lab.runner import Setting

    s = Setting(method="lora", regularizer="none", seed=0, steps=4, images_per_prompt=1, checkpoints=0)
    run = tmp_path / "runs-v2" / s.name
    run.mkdir(parents=True)
    record = _eval("lora", "none", 0, 2, 0.1)
    record["setting"] = {**s.record(), "steps": 6}
    P.eval_file(run, 2).write_text(json.dumps(record))
    with pytest.raises(AccordError, match=r"eval-step-2.json was evaluated with other settings \(steps\)"):
        P.run_setting_v2(s, tmp_path, None, (2, 4))
    record["setting"]["steps"] = 4
    P.eval_file(run, 2).write_text(json.dumps(record))
    P.eval_file(run, 4).write_text(json.dumps({**record, "step": 4}))
    assert [r["step"] for r in P.run_setting_v2(s, tmp_path, None, (2, 4))] == [2, 4]  # all done: nothing runs


@pytest.mark.parametrize("argv, schedule", [
    ([], (600, (300, 600))),
    (["--steps", "200"], (200, (100, 200))),
    (["--quick"], (100, (50, 100))),
    (["--quick", "--steps", "8"], (8, (2, 4, 6, 8))),  # the horizon trained is the one evaluated last
    (["--eval-at", "3,9"], (9, (3, 9))),
])
def test_v2_schedule_evaluates_the_trained_horizon(argv, schedule):
    from accord.cli import build_parser
    from accord.commands.lab import v2_schedule

    args = build_parser().parse_args(["lab", "bench", "--protocol", "2", *argv])
    assert v2_schedule(args) == schedule


def test_the_default_v2_bench_is_the_decoupling_comparison(tmp_path, monkeypatch):
    """Without --methods/--regularizers/--images, protocol 2 benches LoRA and DreamBooth, each with none, Eq. 8 and
    the conditional form, 5 seeds, 2 images, at 300 and 600: the scope that fits 90 min on 2 cores."""
    from accord.cli import main
    from accord.lab import protocol

    seen = {}

    def fake_bench(settings, folder, eval_at, **kw):
        seen.update(settings=settings, eval_at=eval_at)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.md").write_text("summary")
        return [], folder / "report.html", 1.0

    monkeypatch.setattr(protocol, "run_bench_v2", fake_bench)
    assert main(["lab", "bench", "--protocol", "2", "--output", str(tmp_path / "b")]) == 0
    names = [s.name for s in seen["settings"]]
    assert len(names) == 30 and seen["eval_at"] == (300, 600)
    assert {n.rsplit("-s", 1)[0] for n in names} == {f"{m}-{r}" for m in ("lora", "dreambooth")
                                                     for r in ("none", "dd", "dd-conditional")}
    assert {s.seed for s in seen["settings"]} == {0, 1, 2, 3, 4}
    assert {s.images_per_prompt for s in seen["settings"]} == {2} and {s.steps for s in seen["settings"]} == {600}
    assert main(["lab", "bench", "--protocol", "2", "--methods", "textual_inversion", "--regularizers", "pd",
                 "--seeds", "2", "--images", "3", "--output", str(tmp_path / "c")]) == 0  # explicit options win
    assert [s.name for s in seen["settings"]] == ["textual_inversion-pd-s0", "textual_inversion-pd-s1"]
    assert {s.images_per_prompt for s in seen["settings"]} == {3}


def test_doses_gather_each_family_at_its_last_step_by_weight(tmp_path):
    """dd, dd@0.03 and dd@1 are one family at 0.2, 0.03 and 1; a family at one weight only draws no dose curve."""
    from accord.lab.runner import dose

    assert dose("dd@0.03") == ("dd", 0.03) and dose("dd") == ("dd", 0.2) and dose("pd") == ("pd", 0.002)
    assert dose("dd-conditional") == ("dd-conditional", 0.2) and dose("dd-anchored@0.5") == ("dd-anchored", 0.5)
    assert dose("none") is None and dose("prior") is None and dose("dd+pd") is None and dose("bogus") is None
    evals = [_eval("db", reg, seed, step, leak)
             for seed in (0, 1) for reg, leak in (("none", 0.6), ("dd@0.03", 0.5), ("dd", 0.4), ("dd@1", 0.2),
                                                  ("dd-conditional", 0.1))
             for step in (1, 2)]
    evals += [_eval("db", "dd@1", seed, 1, 0.9) for seed in (0, 1)]  # an earlier step: not the dose's point
    d = P.doses(P.summarize_steps(evals))
    assert list(d) == ["db"] and list(d["db"]["families"]) == ["dd"]  # conditional ran at one weight only
    assert [(w, round(m, 6)) for w, m, *_ in d["db"]["families"]["dd"]] == [(0.03, 0.5), (0.2, 0.4), (1.0, 0.2)]
    assert d["db"]["none"][0] == pytest.approx(0.6) and d["db"]["none"][2] == pytest.approx(0.5)
    P.write_report_v2(tmp_path, evals, title="t", intro="i")
    assert "<img src='dose-db.png'>" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "dose-db.png").stat().st_size > 1000
    assert P.doses(P.summarize_steps([e for e in evals if e["setting"]["regularizer"] in ("none", "dd")])) == {}
