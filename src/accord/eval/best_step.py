"""Pick the best checkpoint of a training run on a validation prompt set (paper Appendix N:
"we … display the results of the best-performing step").

Each ``OUTPUT/checkpoints/step-*/`` holds the same files as the final output. The base pipeline is
loaded once; each checkpoint is applied with its method's ``load_into`` (:mod:`accord.inference`),
its images generated and scored, then unloaded (``Method.unload_from``; where a method cannot, as
DreamBooth, the base pipeline is loaded again for the next checkpoint). A *criterion* is a metric
name (its own direction: Gram-D lower is better, the rest higher) or a weighted sum maximised as
written, e.g. ``0.5*clip_t+0.5*dino_i`` or ``clip_t-0.001*gram_d``. Writes ``best_step.json``, ``best_step.csv``
and ``best_step.png``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError
from ..figure import saved_figure
from .metrics import METRICS

__all__ = ["Criterion", "find_checkpoints", "trained_checkpoints", "parse_criterion", "select_best_step"]

_TERM = re.compile(r"\s*([+-])?\s*(?:(\d+(?:\.\d*)?|\.\d+)\s*\*?\s*)?([a-z_]+)\s*")


@dataclass(frozen=True)
class Criterion:
    weights: dict[str, float]  # metric -> weight; the score is the weighted sum, maximised
    text: str

    def __call__(self, means: dict[str, float]) -> float:
        return sum(w * means[m] for m, w in self.weights.items())


def parse_criterion(text: str) -> Criterion:
    """``clip_t`` → {clip_t: 1}; ``gram_d`` → {gram_d: -1}; ``0.5*clip_t+0.5*dino_i`` as written."""
    text = text.strip()
    if text in METRICS:
        return Criterion({text: 1.0 if METRICS[text].higher_is_better else -1.0}, text)
    weights: dict[str, float] = {}
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or m.end() == pos or (pos > 0 and not m.group(1)):
            raise ConfigError(f"--best-step {text!r}: write a metric name or a sum like '0.5*clip_t+0.5*dino_i'")
        sign, number, name = m.groups()
        if name not in METRICS:
            raise ConfigError(f"--best-step {text!r}: unknown metric {name!r}; choose from {', '.join(METRICS)}")
        weights[name] = weights.get(name, 0.0) + (-1 if sign == "-" else 1) * float(number or 1)
        pos = m.end()
    if not weights:
        raise ConfigError(f"--best-step {text!r}: empty criterion")
    return Criterion(weights, text)


def trained_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoints/step-N`` holding a method's output, by step (none: empty)."""
    from ..inference import is_trained_output

    root = Path(run_dir) / "checkpoints"
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        suffix = p.name[len("step-") :]
        if p.is_dir() and suffix.isdigit() and is_trained_output(p):
            found.append((int(suffix), p))
    return sorted(found)


def find_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """:func:`trained_checkpoints`, refusing a run that has none."""
    found = trained_checkpoints(run_dir)
    if not found:
        root = Path(run_dir) / "checkpoints"
        raise DataError(f"{root}: no step-N checkpoint folders with trained outputs; train with checkpoint_every > 0")
    return found


def _plot(curve: Sequence[dict], names: Sequence[str], criterion: Criterion, best: int, path: Path) -> None:
    panels = [*names, "criterion"]
    with saved_figure(path, figsize=(3.2 * len(panels), 3), ncols=len(panels), dpi=100, squeeze=False) as (fig, axes):
        steps = [c["step"] for c in curve]
        for ax, name in zip(axes[0], panels):
            ax.plot(steps, [c[name] for c in curve], marker="o")
            ax.axvline(best, color="tab:red", linestyle="--", linewidth=1)
            ax.set_title(criterion.text if name == "criterion" else name, fontsize=9)
            ax.set_xlabel("step")


def select_best_step(
    run_dir: str | Path,
    prompts,
    metric_names: Sequence[str],
    criterion: str | Criterion,
    out_dir: str | Path,
    settings,
    generation: dict,
    base_model: str | None = None,
    device: str = "cpu",
    dtype=None,
    scheduler: str = "ddim",
    reference_masks: str | Path | None = None,
) -> dict:
    """Evaluate every checkpoint, write the curve and the choice, and return the choice."""
    from ..inference import load_base, read_run_config
    from .harness import build_metrics, generate_rows, score_rows, summarize, write_csv
    from .pipelines import load_adapters, prepare, unload_adapters

    crit = criterion if isinstance(criterion, Criterion) else parse_criterion(criterion)
    names = list(dict.fromkeys([*metric_names, *crit.weights]))
    checkpoints = find_checkpoints(run_dir)
    metrics = build_metrics(names, settings)
    run_config = read_run_config(run_dir)
    out_dir = Path(out_dir)
    curve = []
    pipe = None
    for step, folder in checkpoints:
        if pipe is None:
            pipe = prepare(load_base(run_dir, base_model=base_model, dtype=dtype), device, dtype, scheduler)
        method = load_adapters(pipe, folder, run_config)
        images_dir = out_dir / "checkpoints" / f"step-{step}"
        rows = generate_rows(pipe, prompts, images_dir, **generation)
        if not unload_adapters(pipe, method):
            pipe = None
        for metric in metrics.values():
            metric.reset()
        score_rows(rows, images_dir, prompts, metrics, reference_masks)
        overall = next(e for e in summarize(rows, names) if e["group"] == "overall")
        means = {m: overall[m] for m in names}
        curve.append({"step": step, "checkpoint": str(folder), **means, "criterion": crit(means)})
    best = max(curve, key=lambda c: c["criterion"])
    write_csv(out_dir / "best_step.csv", curve)
    _plot(curve, names, crit, best["step"], out_dir / "best_step.png")
    result = {
        "best_step": best["step"],
        "checkpoint": best["checkpoint"],
        "criterion": crit.text,
        "weights": crit.weights,
        "best_score": best["criterion"],
        "metrics": {m: best[m] for m in names},
        "curve": str(out_dir / "best_step.csv"),
        "plot": str(out_dir / "best_step.png"),
    }
    (out_dir / "best_step.json").write_text(json.dumps(result, indent=2))
    return result
