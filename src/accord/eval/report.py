"""Evaluation reports: ``scores.csv`` (per image), ``summary.csv``, PNG grids and plots, ``report.html``."""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from ..figure import saved_figure
from .harness import write_csv
from .metrics import METRICS

__all__ = ["image_grid", "plot_by_category", "write_report"]


def _fmt(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return html.escape(str(value))


def image_grid(rows: Sequence[dict], images_dir: Path, cell: int = 128) -> Image.Image:
    """One line per prompt (its images side by side) with the prompt written above."""
    by_prompt: dict[str, list[Path]] = defaultdict(list)
    for row in rows:
        by_prompt[row["prompt"]].append(images_dir / row["file"])
    cols = max(len(v) for v in by_prompt.values())
    label = 14
    grid = Image.new("RGB", (cols * cell, len(by_prompt) * (cell + label)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, files) in enumerate(by_prompt.items()):
        y = r * (cell + label)
        draw.text((2, y + 1), prompt[:80], fill="black")
        for c, file in enumerate(files):
            with Image.open(file) as im:
                grid.paste(im.convert("RGB").resize((cell, cell)), (c * cell, y + label))
    return grid


def plot_by_category(summary: Sequence[dict], metric_names: Sequence[str], path: Path) -> Path:
    """Bar charts, one panel per metric, of the per-category means."""
    cats = [e for e in summary if e["group"] == "category"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with saved_figure(path, figsize=(3.2 * len(metric_names), 3.2), ncols=len(metric_names), dpi=100,
                      squeeze=False) as (fig, axes):
        for ax, name in zip(axes[0], metric_names):
            ax.bar(range(len(cats)), [e[name] for e in cats], color="tab:blue")
            ax.set_xticks(range(len(cats)), [e["name"].replace("_", "\n") for e in cats], fontsize=7)
            arrow = "↑" if METRICS[name].higher_is_better else "↓"
            ax.set_title(f"{name} {arrow}")
    return path


def _table(entries: Sequence[dict], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(e.get(c, ''))}</td>" for c in columns) + "</tr>" for e in entries)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(
    out_dir: str | Path,
    rows: Sequence[dict],
    summary: Sequence[dict],
    metric_names: Sequence[str],
    images_dir: str | Path,
    title: str = "accord eval",
    settings: dict | None = None,
) -> dict[str, Path]:
    """Write all report files under ``out_dir``; returns name -> path."""
    out_dir, images_dir = Path(out_dir), Path(images_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "scores": write_csv(out_dir / "scores.csv", rows),
        "summary": write_csv(out_dir / "summary.csv", summary),
        "plot": plot_by_category(summary, metric_names, out_dir / "plots" / "by_category.png"),
    }
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_subject[row["subject"]].append(row)
    grids = {}
    for subject, members in by_subject.items():
        grids[subject] = out_dir / "grids" / f"{subject}.png"
        grids[subject].parent.mkdir(parents=True, exist_ok=True)
        image_grid(members, images_dir).save(grids[subject])

    cols = ["name", "images", "share", *metric_names]
    arrows = ", ".join(f"{m} {'↑' if METRICS[m].higher_is_better else '↓'}" for m in metric_names)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{len(rows)} images; {html.escape(arrows)}</p>",
        "<h2>Overall</h2>" + _table([e for e in summary if e["group"] == "overall"], cols),
        "<h2>By prompt category</h2>" + _table([e for e in summary if e["group"] == "category"], cols),
        f"<img src='{paths['plot'].relative_to(out_dir).as_posix()}' alt='per-category means'>",
        "<h2>By subject</h2>" + _table([e for e in summary if e["group"] == "subject"], cols),
        "<h2>Images</h2>",
    ]
    for subject, grid in grids.items():
        parts.append(f"<h3>{html.escape(subject)}</h3><a href='{grid.relative_to(out_dir).as_posix()}'>"
                     f"<img src='{grid.relative_to(out_dir).as_posix()}' alt='{html.escape(subject)}'></a>")
    if settings:
        parts.append("<h2>Settings</h2>"
                     + _table([{"setting": k, "value": v} for k, v in settings.items()], ["setting", "value"]))
    parts.append("</body></html>")
    paths["html"] = out_dir / "report.html"
    paths["html"].write_text("\n".join(parts), encoding="utf-8")
    return paths
