"""Protocol v2 of the coupling lab: train each run to a longer horizon, evaluate every checkpoint, and
compare regularizers with the baseline at matched fidelity (docs/lab.md, "Protocol v2").

Each (run, step) evaluation is written to ``<output>/runs-v2/<run>/eval-step-<N>.json`` as soon as it is done, so a
bench that stopped resumes where it stopped: finished evaluations are read back, checkpoints still on disk are
evaluated without training, and training resumes from the last checkpoint when later steps are missing.

The aggregation (:func:`summarize_steps`, :func:`curves`, :func:`match_step`, :func:`best_step`,
:func:`relative_change`, :func:`compare`) is pure: lists of evaluation records in, numbers out.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..eval.best_step import Criterion
from ..figure import saved_figure
from .report import _html, _markdown, ci95, figures, first_seed_grids, format_value, per_seed, write_page

__all__ = ["V2_STEPS", "V2_SEEDS", "V2_METHODS", "V2_REGULARIZERS", "V2_IMAGES", "QUICK", "TOLERANCE", "TARGET",
           "BEST_STEP", "quick_prompts",
           "run_setting_v2", "run_bench_v2", "summarize_steps", "curves", "doses", "match_step", "best_step",
           "relative_change", "compare", "write_report_v2"]

# The paper trains LoRA, DreamBooth, Textual Inversion and Custom Diffusion the same 1,000 steps (Break-A-Scene
# 400 + 400); the lab's protocol 1 stops at 150. v2 trains every method 4x longer, to 600, one horizon for all as
# the paper does (Break-A-Scene keeps its half/half phases), and evaluates its checkpoints (by default at 300 and
# 600; a checkpoint at 150 is trained as protocol 1's horizon: a constant learning rate, the same seed and batch
# order).
V2_STEPS = 600
V2_SEEDS = 5
# The default bench is the decoupling comparison RESULTS.md reports, sized to run in 90 min on 2 cores: the two
# methods the target names, each with no regularizer, Eq. 8 as written and the conditional form, 5 seeds, 2 images
# per prompt, evaluated at the half and the end of the horizon (30 runs; measured per run on 2 cores: DreamBooth
# 3.5 / 4.8 / 5.5 min, LoRA 3.2-4.4 / 4.9 / 5.7 min, so about 70 min with two at a time; docs/lab.md). The other
# methods and regularizers are named with --methods / --regularizers.
V2_METHODS = ("lora", "dreambooth")
V2_REGULARIZERS = ("none", "dd", "dd-conditional")
V2_IMAGES = 2
QUICK = {"seeds": 2, "steps": 100, "eval_at": (50, 100), "images": 2}
TOLERANCE = 0.05  # equal fidelity: within 5 points
TARGET = -0.5  # the decoupling target: at least a 50% relative leak reduction
# The paper's best-step rule (Appendix N: the best-performing step) in accord.eval.best_step's form, on the lab's
# metrics: the step that maximises the mean of text accuracy and fidelity (as 0.5*clip_t+0.5*dino_i there).
BEST_STEP = Criterion({"text": 0.5, "fidelity": 0.5}, "0.5*text+0.5*fidelity")
_METRICS = ("leak", "text", "fidelity")


def quick_prompts(task) -> tuple:
    """``--quick``'s prompts: the first prompt of each category that counts for the leak rate, and the first
    control prompt (one that asks for the coupled concept), in the task's order."""
    keep, seen, control = [], set(), False
    for p in task.prompts:
        if p.asks_coupled and not control:
            keep.append(p)
            control = True
        elif not p.asks_coupled and p.category not in seen:
            keep.append(p)
            seen.add(p.category)
    return tuple(keep)


# ---------------------------------------------------------------------------- running


def eval_file(run_dir: Path, step: int) -> Path:
    return run_dir / f"eval-step-{step}.json"


def _checkpoints(out: Path) -> dict[int, Path]:
    """step → ``checkpoints/step-N`` folder holding a method's output."""
    from ..eval.best_step import trained_checkpoints

    return dict(trained_checkpoints(out))


def _train(s, out: Path, refs: Path, eval_at: tuple, pending: list[int], weights, progress: bool) -> None:
    """Train so that every pending step has a checkpoint: resume from the last checkpoint when all pending steps lie
    beyond it, else start over (a missing checkpoint below the last one cannot be made by resuming)."""
    from ..train import train
    from .runner import build_config

    config = build_config(replace(s, checkpoints=0), refs, out, weights)
    config.train.checkpoint_every = math.gcd(*eval_at)
    have = _checkpoints(out)
    missing = [k for k in pending if k not in have]
    if not missing:
        return
    if have and min(missing) > max(have):
        train(config, resume="latest", progress=progress)
    else:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        train(config, progress=progress)


def run_setting_v2(s, root: Path, judge, eval_at: tuple, weights: Path | None = None,
                   progress: bool = False) -> list[dict]:
    """Protocol v2 for one setting (``s.steps`` is the horizon): the evaluation record of every step of
    ``eval_at``, reusing those already on disk and writing each new one as soon as it is done."""
    from ..errors import AccordError
    from ..inference import is_trained_output, load_trained
    from .runner import METHODS, evaluate, references

    trigger = METHODS[s.method]["trigger"]
    out = root / "runs-v2" / s.name
    setting = s.record()
    done = {k: json.loads(eval_file(out, k).read_text()) for k in eval_at if eval_file(out, k).is_file()}
    for k, record in done.items():
        differs = sorted(key for key, v in setting.items() if record["setting"].get(key) != v)
        if differs:
            raise AccordError(f"{eval_file(out, k)} was evaluated with other settings ({', '.join(differs)}); give "
                              "this bench its own --output folder (a folder resumes only the same settings)")
    pending = [k for k in eval_at if k not in done]
    if not pending:
        return [done[k] for k in eval_at]
    refs = references(root / "references" / s.method, trigger, s.method, s.task)
    if not (pending == [s.steps] and is_trained_output(out)):  # the final weights stay in the run folder
        _train(s, out, refs, eval_at, pending, weights, progress)
    have = _checkpoints(out)
    for k in pending:
        ckpt = have.get(k, out if k == s.steps else None)
        rows, images = evaluate(load_trained(ckpt), s, refs, trigger, judge)
        record = {"protocol": 2, "name": s.name, "step": k, "setting": setting, "rows": rows}
        tmp = eval_file(out, k).with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(eval_file(out, k))  # whole or absent: a kill never leaves half a record
        if k == s.steps:
            np.save(out / "samples.npy", np.stack(images))
        done[k] = record
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the final weights stay in the run folder
    return [done[k] for k in eval_at]


def run_bench_v2(settings: list, folder: Path, eval_at: tuple, *, title: str, intro: str,
                 reference_step: int | None = None, weights: Path | None = None,
                 progress: bool = True, jobs: int = 1) -> tuple[list[dict], Path, float]:
    """Run every setting under protocol v2 (resuming; ``jobs`` at a time), then write ``evals.json``, ``summary.md``
    and ``report.html``."""
    import time

    from .experiment import map_runs, open_bench

    task, judge, t0 = open_bench(settings, folder, weights, "runs-v2/*/eval-step-*.json", "protocol-v2 runs")
    runs = map_runs(run_setting_v2, settings, judge, jobs=jobs, desc="lab runs (protocol 2)", progress=progress,
                    weights=weights, root=folder, eval_at=eval_at)
    evals = [e for run in runs for e in run]
    seconds = time.time() - t0
    (folder / "evals.json").write_text(json.dumps(evals))
    report = write_report_v2(folder, evals, title=title, intro=intro + f" Wall time: {seconds / 60:.1f} min.",
                             reference_step=reference_step, task=task)
    return evals, report, seconds


# ---------------------------------------------------------------------------- aggregation (pure)


def _key(record: dict) -> tuple:
    return record["setting"]["method"], record["setting"]["regularizer"], record["step"]


def _per_seed(evals: list[dict]) -> dict[tuple, dict[int, dict]]:
    """(method, regularizer, step) → seed → the run's metric means (:func:`accord.lab.report.per_seed`)."""
    out: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in evals:
        out[_key(r)][r["setting"]["seed"]] = per_seed(r)
    return out


def summarize_steps(evals: list[dict]) -> list[dict]:
    """One row per (method, regularizer, step), in first-seen (method, regularizer) order and by step: leak, text
    accuracy and fidelity as (mean, 95% t half-width) over seeds, the seed count and the per-seed values."""
    rows, order = [], _order(evals)
    for key, seeds in sorted(_per_seed(evals).items(), key=lambda kv: (order[kv[0][:2]], kv[0][2])):
        row = {"method": key[0], "regularizer": key[1], "step": key[2], "seeds": len(seeds),
               "per_seed": {m: {sd: v[m] for sd, v in seeds.items()} for m in _METRICS}}
        for m in _METRICS:
            row[m] = ci95([v[m] for v in seeds.values()])
        rows.append(row)
    return rows


def _order(evals: list[dict]) -> dict[tuple, int]:
    order: dict[tuple, int] = {}
    for r in evals:
        order.setdefault(_key(r)[:2], len(order))
    return order


def curves(rows: list[dict]) -> dict[str, dict[str, list[tuple]]]:
    """Leak-vs-fidelity curve data: method → regularizer → [(step, fidelity, its half-width, leak, its
    half-width)] by step, from :func:`summarize_steps`'s rows."""
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[r["method"]][r["regularizer"]].append((r["step"], *r["fidelity"], *r["leak"]))
    return {m: {reg: sorted(pts) for reg, pts in regs.items()} for m, regs in out.items()}


def doses(rows: list[dict]) -> dict[str, dict]:
    """Dose–response data at each run's last step, from :func:`summarize_steps`'s rows: method → {"none": the
    baseline's (leak, its half-width, fidelity, its half-width) or None, "families": {family: [(weight, leak, lh,
    fidelity, fh)] by weight}}, keeping the families (``dd``, ``dd-conditional``, ``pd``, ...) run at two or more
    weights (``dd`` and ``dd@0.2`` are one weight)."""
    from .runner import dose

    last = {(r["method"], r["regularizer"]): r for r in rows}  # rows come by step: the last one stays
    out: dict[str, dict] = {}
    for (method, reg), r in last.items():
        entry = out.setdefault(method, {"none": None, "families": defaultdict(dict)})
        point = (*r["leak"], *r["fidelity"])
        if reg == "none":
            entry["none"] = point
        elif (fw := dose(reg)) is not None:
            entry["families"][fw[0]].setdefault(fw[1], point)
    for method, entry in list(out.items()):
        fams = {f: sorted((w, *pt) for w, pt in ws.items()) for f, ws in entry["families"].items() if len(ws) > 1}
        if fams:
            entry["families"] = fams
        else:
            del out[method]
    return out


def match_step(rows: list[dict], target: float, tolerance: float = TOLERANCE) -> dict | None:
    """The row (one regularizer's steps) whose mean fidelity is closest to ``target``, if within ``tolerance``
    (fidelity is a share: 0.05 = 5 points); the earlier step on a tie; None when no step is within."""
    near = [r for r in rows if abs(r["fidelity"][0] - target) <= tolerance + 1e-12]
    return min(near, key=lambda r: (round(abs(r["fidelity"][0] - target), 9), r["step"])) if near else None


def best_step(rows: list[dict], criterion: Criterion = BEST_STEP) -> dict:
    """The row (one regularizer's steps) maximising ``criterion`` on the mean metrics; the earlier step on a tie."""
    return max(rows, key=lambda r: (criterion({m: r[m][0] for m in _METRICS}), -r["step"]))


def relative_change(base: dict, other: dict) -> tuple[float, float, float, int]:
    """Relative change of ``other``'s mean from ``base``'s (seed → value, paired on the seeds both have), with a
    95% interval: a t-interval on the per-seed differences ``other − base``, divided by the baseline's mean over
    those seeds (held fixed). Returns (change, low, high, seeds); nan where the baseline's mean is 0 or there is no
    interval (one seed)."""
    seeds = sorted(set(base) & set(other))
    if not seeds:
        return float("nan"), float("nan"), float("nan"), 0
    b = float(np.mean([base[s] for s in seeds]))
    mean, half = ci95([other[s] - base[s] for s in seeds])
    if b == 0:
        return float("nan"), float("nan"), float("nan"), len(seeds)
    return mean / b, (mean - half) / b, (mean + half) / b, len(seeds)


def _meets(change: tuple, matched: bool) -> str:
    rel, _, high, _ = change
    if not matched:
        return "no match"
    return "yes" if rel <= TARGET and high < 0 else "no"


def compare(rows: list[dict], reference_step: int | None = None, tolerance: float = TOLERANCE) -> list[dict]:
    """Each regularizer against ``none`` of the same method, by two rules:

    * ``matched``: the baseline at ``reference_step`` (default: its last step) against the regularizer's step whose
      mean fidelity is closest to the baseline's there, within ``tolerance`` (else "no match");
    * ``best step``: each at its own :data:`BEST_STEP` step; a match when their fidelities are within ``tolerance``.

    Each comparison has the relative leak change with its interval (:func:`relative_change`) and ``meets``: "yes"
    when the change is at most −50% and its interval excludes 0 at matched fidelity, "no", or "no match"."""
    by: dict[tuple, list] = defaultdict(list)
    for r in rows:
        by[(r["method"], r["regularizer"])].append(r)
    out = []
    for (method, reg), mine in by.items():
        base = by.get((method, "none"))
        if reg == "none" or not base:
            continue
        ref_step = reference_step if reference_step is not None else max(r["step"] for r in base)
        ref = next((r for r in base if r["step"] == ref_step), None)
        if ref is None:
            continue
        pairs = [("matched fidelity", ref, match_step(mine, ref["fidelity"][0], tolerance))]
        b0, b1 = best_step(base), best_step(mine)
        pairs.append((f"best step ({BEST_STEP.text})", b0,
                      b1 if abs(b1["fidelity"][0] - b0["fidelity"][0]) <= tolerance + 1e-12 else None))
        for rule, b, r in pairs:
            row = {"method": method, "regularizer": reg, "rule": rule, "base_step": b["step"],
                   "base_fidelity": b["fidelity"], "base_leak": b["leak"], "step": None, "fidelity": None,
                   "leak": None, "change": (float("nan"),) * 3 + (0,), "meets": "no match"}
            shown = r or (b1 if rule.startswith("best") else None)
            if shown is not None:
                row.update(step=shown["step"], fidelity=shown["fidelity"], leak=shown["leak"],
                           change=relative_change(b["per_seed"]["leak"], shown["per_seed"]["leak"]))
            if r is not None:
                row["meets"] = _meets(row["change"], True)
            out.append(row)
    return out


# ---------------------------------------------------------------------------- report


def _pct(v) -> str:
    return "—" if v is None else format_value("leak", *v)


def _change(c: tuple) -> str:
    rel, low, high, _ = c
    if math.isnan(rel):
        return "—"
    if math.isnan(low):
        return f"{100 * rel:+.0f}%"
    return f"{100 * rel:+.0f}% [{100 * low:+.0f}, {100 * high:+.0f}]"


_STEP_HEAD = ["method", "regularizer", "step", "seeds", "leak rate", "text accuracy", "fidelity"]
_CMP_HEAD = ["method", "regularizer", "rule", "none: step", "none: fidelity", "none: leak", "matched step",
             "fidelity", "leak", "relative leak change [95%]", "meets target"]


def _step_cells(r: dict) -> list[str]:
    return [r["method"], r["regularizer"], str(r["step"]), str(r["seeds"]), *[_pct(r[m]) for m in _METRICS]]


def _cmp_cells(r: dict) -> list[str]:
    step = "no match" if r["step"] is None else str(r["step"]) + ("" if r["meets"] != "no match" else " (no match)")
    return [r["method"], r["regularizer"], r["rule"], str(r["base_step"]), _pct(r["base_fidelity"]),
            _pct(r["base_leak"]), step, _pct(r["fidelity"]), _pct(r["leak"]), _change(r["change"]), r["meets"]]


def curve_plot(method: str, data: dict[str, list[tuple]], path: Path) -> Path:
    """One method's leak-vs-fidelity curves: a line per regularizer through its steps, 95% error bars both ways."""
    with saved_figure(path, figsize=(5, 3.6)) as (fig, ax):
        for reg, pts in data.items():
            steps, fid, fh, leak, lh = (np.array(v, float) for v in zip(*pts))
            ax.errorbar(100 * fid, 100 * leak, xerr=100 * np.nan_to_num(fh), yerr=100 * np.nan_to_num(lh), marker="o",
                        capsize=3, label=reg)
            for st, x, y in zip(steps, fid, leak):
                ax.annotate(str(int(st)), (100 * x, 100 * y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlim(-3, 103)  # rates: an interval past 0 or 100 (few seeds) is cut at the frame, not the axis stretched
        ax.set_ylim(-3, 103)
        ax.set_xlabel("fidelity (%)")
        ax.set_ylabel("leak rate (%)")
        ax.set_title(f"{method}: leak vs fidelity over training (points: steps; 95% CI)", fontsize=8)
        ax.legend(fontsize=7)
    return path


def dose_plot(method: str, data: dict, path: Path) -> Path:
    """One method's dose–response at the last step: leak and fidelity against each family's weight (log axis),
    95% error bars, the baseline (``none``) as a dashed line with its interval shaded."""
    with saved_figure(path, figsize=(8, 3.4), ncols=2) as (fig, axes):
        for k, (ax, label) in enumerate(zip(axes, ("leak rate (%)", "fidelity (%)"))):
            if data["none"] is not None:
                mean, half = (100 * np.nan_to_num(np.array(data["none"][2 * k: 2 * k + 2], float)))
                ax.axhline(mean, color="k", ls="--", lw=1, label="none")
                ax.axhspan(mean - half, mean + half, color="k", alpha=0.08)
            for family, pts in data["families"].items():
                cols = [np.array(c, float) for c in zip(*pts)]  # weight, leak, its half-width, fidelity, its half-width
                w, m, h = cols[0], cols[1 + 2 * k], cols[2 + 2 * k]
                ax.errorbar(w, 100 * m, yerr=100 * np.nan_to_num(h), marker="o", capsize=3, label=family)
            ax.set_xscale("log")
            ax.set_ylim(-3, 103)
            ax.set_xlabel("weight")
            ax.set_ylabel(label)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{method}: dose–response at the last step (95% CI)", fontsize=9)
    return path


def write_report_v2(folder: Path, evals: list[dict], *, title: str, intro: str, reference_step: int | None = None,
                    task=None) -> Path:
    """``summary.md`` and ``report.html`` of a protocol-v2 bench: the per-step table, the curves, the matched
    comparison."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = summarize_steps(evals)
    cmp = compare(rows, reference_step)
    at = f"step {reference_step}" if reference_step else "its last step"
    method_text = (f"Matched fidelity: the baseline (`none`) at {at} against the "
                   f"regularizer's step with the closest mean fidelity, within ±{100 * TOLERANCE:.0f} points (else no "
                   f"match). Best step: each at the step maximising {BEST_STEP.text} (means over seeds), a match when "
                   f"their fidelities are within ±{100 * TOLERANCE:.0f} points. Relative leak change: mean per-seed "
                   "difference (regularizer − none, paired by seed) over the baseline's mean leak, with a 95% "
                   "t-interval on the differences. Target: a change ≤ −50% at matched fidelity whose "
                   "interval excludes 0.")
    md = ["## Per step (mean ± 95% t-interval over seeds)", "", _markdown(_STEP_HEAD, [_step_cells(r) for r in rows]),
          "", "## Matched fidelity", "", method_text, "", _markdown(_CMP_HEAD, [_cmp_cells(r) for r in cmp]), ""]
    (folder / "summary.md").write_text("\n".join(md))
    curve_files = [curve_plot(m, data, folder / f"curve-{m}.png") for m, data in curves(rows).items()]
    curve_files += [dose_plot(m, data, folder / f"dose-{m}.png") for m, data in doses(rows).items()]
    grids = first_seed_grids(evals, folder, "runs-v2", keep=lambda r: r["step"] == r["setting"].get("steps"))
    about = f"<p>Task <b>{html.escape(task.name)}</b>: {html.escape(task.description)}</p>" if task else ""
    parts = [f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>{about}",
             "<h2>Leak vs fidelity over training (and dose–response, where a loss ran at several weights)</h2><p>"
             + " ".join(f"<img src='{html.escape(p.name)}'>" for p in curve_files) + "</p>",
             "<h2>Matched fidelity</h2>", f"<p>{html.escape(method_text)}</p>",
             _html(_CMP_HEAD, [_cmp_cells(r) for r in cmp]),
             "<h2>Per step</h2><p>Mean ± 95% t-interval over seeds.</p>",
             _html(_STEP_HEAD, [_step_cells(r) for r in rows])]
    if grids:
        parts.append("<h2>Samples at the last step</h2><p>Rows: the evaluation prompts, in order; columns: images "
                     "(first seed).</p>" + figures(grids))
    return write_page(folder / "report.html", title, parts)
