"""Aggregate lab results across seeds (mean and 95% t-interval, seeds as the unit), draw the figures and
write the HTML report."""

from __future__ import annotations

import html
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..figure import saved_figure

__all__ = ["METRICS", "TERMS", "per_seed", "summarize", "summarize_terms", "ci95", "format_table", "format_terms",
           "format_value", "first_seed_grids", "write_report"]

METRICS = ("leak", "text", "fidelity", "clip_t", "clip_i")
_LABEL = {"leak": "leak rate", "text": "text accuracy", "fidelity": "fidelity", "clip_t": "mini-CLIP-T",
          "clip_i": "mini-CLIP-I"}
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def ci95(values) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval (nan half-width for one value)."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    t = _T975.get(len(v) - 1, 1.96)
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v)))


def per_seed(result: dict, category: str | None = None) -> dict[str, float]:
    """One run's metric means; the leak rate counts only prompts that do not ask for the coupled object."""
    rows = [r for r in result["rows"] if category is None or r["category"] == category]
    out = {}
    for m in METRICS:
        use = [r for r in rows if not (m == "leak" and r["asks_coupled"])]
        out[m] = float(np.mean([r[m] for r in use])) if use else float("nan")
    return out


def _by_setting(results: list[dict], value) -> dict[tuple, list]:
    """``value(run)`` of each run, grouped by (method, regularizer) in first-seen order; None values are left out."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in results:
        v = value(r)
        if v is not None:
            groups[(r["setting"]["method"], r["setting"]["regularizer"])].append(v)
    return groups


def summarize(results: list[dict], category: str | None = None) -> list[dict]:
    """One row per (method, regularizer): each metric's mean and CI over seeds, and the seed count."""
    rows = []
    for (method, reg), seeds in _by_setting(results, lambda r: per_seed(r, category)).items():
        row = {"method": method, "regularizer": reg, "seeds": len(seeds)}
        for m in METRICS:
            row[m] = ci95([s[m] for s in seeds])
        rows.append(row)
    return rows


def format_value(m: str, mean: float, half: float) -> str:
    """``mean ± half`` of metric ``m``, the rates in percent; the mean alone where ``half`` is NaN (one seed)."""
    scale = 100 if m in ("leak", "text", "fidelity") else 1
    unit = "%" if scale == 100 else ""
    if math.isnan(half):
        return f"{mean * scale:.1f}{unit}"
    return f"{mean * scale:.1f} ± {half * scale:.1f}{unit}"


_HEAD = ["method", "regularizer", "seeds", *[_LABEL[m] for m in METRICS]]


def _cells(r: dict) -> list[str]:
    return [r["method"], r["regularizer"], str(r["seeds"]), *[format_value(m, *r[m]) for m in METRICS]]


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def _html(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`summarize`."""
    return _markdown(_HEAD, [_cells(r) for r in rows])


TERMS = ("personal", "general", "null", "shift")


def summarize_terms(results: list[dict]) -> list[dict]:
    """Eq. 7's terms (``dependence_terms``) at the base model and at each run's last checkpoint, per
    (method, regularizer): mean and 95% interval over seeds. Runs without the terms are left out."""
    def base_and_last(r: dict):
        terms = r.get("dependence_terms")
        return (terms.get("0"), terms[str(max(int(k) for k in terms))]) if terms else None

    rows = []
    for (method, reg), runs in _by_setting(results, base_and_last).items():
        row = {"method": method, "regularizer": reg, "seeds": len(runs)}
        for t in TERMS:
            row[t] = ci95([last[t] for _, last in runs])
            row[f"base_{t}"] = ci95([base[t] for base, _ in runs if base])
        rows.append(row)
    return rows


def _terms_cells(r: dict) -> list[str]:
    return [r["method"], r["regularizer"], str(r["seeds"]),
            *[f"{_sci(*r[f'base_{t}'])} → {_sci(*r[t])}" for t in TERMS]]


def _sci(mean: float, half: float) -> str:
    return f"{mean:.2e}" if math.isnan(half) else f"{mean:.2e} ± {half:.1e}"


_TERMS_HEAD = ["method", "regularizer", "seeds", *[f"{t} (base → end)" for t in TERMS]]


def format_terms(rows: list[dict]) -> str:
    """Markdown table of :func:`summarize_terms` (nats per element)."""
    return _markdown(_TERMS_HEAD, [_terms_cells(r) for r in rows])


def _html_table(rows: list[dict]) -> str:
    return _html(_HEAD, [_cells(r) for r in rows])


def leak_bars(rows: list[dict], path: Path, title: str = "leak rate (coupled object appears unasked)") -> Path:
    labels = [f"{r['method']}\n{r['regularizer']}" for r in rows]
    means = [100 * r["leak"][0] for r in rows]
    errs = [0 if math.isnan(r["leak"][1]) else 100 * r["leak"][1] for r in rows]
    with saved_figure(path, figsize=(max(4, 0.9 * len(rows) + 1), 3.2)) as (fig, ax):
        ax.bar(range(len(rows)), means, yerr=errs, capsize=4,
               color=["#c44" if r["regularizer"] == "none" else "#48c" for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("% of images (95% CI over seeds)")
        ax.set_ylim(0, 100)
        ax.set_title(title, fontsize=9)
    return path


def shift_curves(results: list[dict], path: Path) -> Path:
    """Fig. 6 analog: mean |Δ| (Eq. 7) on the reference captions over training, per setting (mean over seeds)."""
    groups: dict[str, list] = defaultdict(list)
    for r in results:
        if r.get("dependence_shift"):
            groups[f"{r['setting']['method']} {r['setting']['regularizer']}"].append(r["dependence_shift"])
    with saved_figure(path, figsize=(5, 3.2)) as (fig, ax):
        for name, curves in groups.items():
            steps = sorted({int(k) for c in curves for k in c})
            ys = [np.mean([c[str(s)] for c in curves if str(s) in c]) for s in steps]
            ax.plot(steps, ys, marker="o", label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel("mean |Δ| per element (nats)")
        ax.set_title("dependence shift over training (Fig. 6 analog)", fontsize=9)
        ax.legend(fontsize=7)
    return path


def sample_grid(result: dict, images: np.ndarray, path: Path, scale: int = 4) -> Path:
    """Rows = prompts, columns = images of one run, upscaled ``scale``× (nearest) for viewing; each row labelled with
    its prompt on the left, and each image the detector counted as a leak framed in red."""
    from PIL import Image, ImageDraw, ImageFont

    n = result["setting"]["images_per_prompt"]
    rows = result.get("rows") or []
    side = images.shape[1] * scale
    pad, label_w = 4, 300
    count = len(images) // n
    canvas = Image.new("RGB", (label_w + n * (side + pad), count * (side + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        font = ImageFont.load_default()
    for i in range(count):
        y = i * (side + pad)
        prompt = rows[i * n]["prompt"] if len(rows) >= (i + 1) * n else ""
        words, lines = prompt.split(" "), [""]
        for w in words:  # wrap to the label column
            trial = f"{lines[-1]} {w}".strip()
            if draw.textlength(trial, font=font) > label_w - 12 and lines[-1]:
                lines.append(w)
            else:
                lines[-1] = trial
        draw.multiline_text((6, y + 6), "\n".join(lines), fill="black", font=font)
        for j in range(n):
            x = label_w + j * (side + pad)
            tile = Image.fromarray(images[i * n + j]).resize((side, side), Image.NEAREST)
            canvas.paste(tile, (x, y))
            if len(rows) > i * n + j and rows[i * n + j].get("leak"):
                draw.rectangle((x, y, x + side - 1, y + side - 1), outline=(220, 0, 0), width=3)
    canvas.save(path)
    return path


def first_seed_grids(records: list[dict], folder: Path, runs: str, keep=None) -> dict[str, Path]:
    """Sample grids (``samples-<name>.png`` in ``folder``) of each (method, regularizer)'s first seed: the records
    ``keep`` accepts (default all) whose ``<folder>/<runs>/<name>/samples.npy`` is on disk."""
    if not records:
        return {}
    first = min(r["setting"]["seed"] for r in records)
    grids = {}
    for r in records:
        samples = folder / runs / r["name"] / "samples.npy"
        if r["setting"]["seed"] == first and (keep is None or keep(r)) and samples.is_file():
            key = f"{r['setting']['method']} + {r['setting']['regularizer']}"
            grids[key] = sample_grid(r, np.load(samples), folder / f"samples-{r['name']}.png")
    return grids


def write_report(folder: Path, results: list[dict], *, title: str, intro: str, grids: dict[str, Path],
                 notes: str = "", task=None) -> Path:
    """``<folder>/report.html`` with the overall and per-category tables and the figures (``task``: the
    :class:`accord.lab.task.Task` the results are of; default the default task)."""
    from .task import DEFAULT_TASK, default_task

    task = task or default_task()
    folder.mkdir(parents=True, exist_ok=True)
    overall = summarize(results)
    leak_bars(overall, folder / "leak_rates.png", **({} if task.name == DEFAULT_TASK else
                                                     {"title": f"leak rate, task {task.name}"}))
    shift_curves(results, folder / "dependence_shift.png")
    about = f"Task <b>{html.escape(task.name)}</b> ({html.escape(task.kind)}): {html.escape(task.description)}"
    if task.leak.description:
        about += f" Leak: {html.escape(task.leak.description)}."
    parts = [f"<h1>{html.escape(title)}</h1><p>{intro}</p><p>{about}</p>", "<h2>All prompts</h2>",
             _html_table(overall), '<p><img src="leak_rates.png"> <img src="dependence_shift.png"></p>']
    if notes:
        parts.append(f"<h2>Reading the numbers</h2><p>{notes}</p>")
    terms = summarize_terms(results)
    if terms:
        parts += ["<h2>Eq. 7's terms on the reference captions</h2><p>‖U_j − U_c‖² / (2σ_t²) per element, in nats, "
                  "for c = the personal phrase, the general concepts and the empty caption, at the base model and "
                  "at the last checkpoint; shift = mean |personal + general − null|. Mean ± 95% interval over "
                  "seeds.</p>", _html(_TERMS_HEAD, [_terms_cells(r) for r in terms])]
    parts.append("<h2>Per prompt category (Appendix H)</h2>")
    for c in task.categories:
        parts += [f"<h3>{c}</h3>", _html_table(summarize(results, c))]
    parts.append("<h2>Samples</h2><p>Rows: the evaluation prompts (also listed below), in order; columns: images "
                 "(first seed); a red frame marks an image the detector counted as a leak.</p>")
    parts.append("<ol>" + "".join(f"<li>[{p.category}] {html.escape(p.text)}</li>" for p in task.prompts) + "</ol>")
    parts.append(figures(grids))
    return write_page(folder / "report.html", title, parts)


def figures(grids: dict[str, Path]) -> str:
    """The sample grids side by side, each captioned with its name."""
    return "<div style='display:flex;gap:16px;flex-wrap:wrap'>" + "".join(
        f"<figure><img src='{html.escape(p.name)}'><figcaption>{html.escape(name)}</figcaption></figure>"
        for name, p in grids.items()) + "</div>"


def write_page(out: Path, title: str, parts: list[str]) -> Path:
    """One report page: ``parts`` (HTML) under ``title``, in the lab reports' style."""
    style = ("<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "td,th{border:1px solid #ccc;padding:3px 6px}table{border-collapse:collapse}</style>")
    out.write_text("<!doctype html><html><head><meta charset='utf-8'>"
                   f"<title>{html.escape(title)}</title>{style}</head><body>"
                   + "".join(parts) + "</body></html>")
    return out
