"""Generate → score → summarise: the pieces ``accord eval`` and best-step selection share.

A *row* is one image: ``file`` (relative to the images folder), ``subject``, ``prompt``,
``category``, ``seed`` and one column per metric. Generated images are written as
``images/<subject>/<prompt index>_<k>.png`` with a ``manifest.csv`` listing the rows; a folder of
images made elsewhere is scored when it has the same ``manifest.csv`` (columns ``file``,
``prompt``, optional ``subject`` and ``category``).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError
from .benchmarks import EvalPrompt
from .images import load_image, mask_files_for
from .metrics import METRICS, Metric

__all__ = [
    "MANIFEST",
    "MetricSettings",
    "build_metrics",
    "generate_rows",
    "parse_metric_names",
    "read_manifest",
    "score_rows",
    "summarize",
    "write_csv",
]

MANIFEST = "manifest.csv"


@dataclass
class MetricSettings:
    """Which model each metric loads; ``models`` holds already-built objects that take precedence."""

    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"
    dino_model: str = "vit_small_patch16_224.dino"
    blip_model: str = "Salesforce/blip-itm-base-coco"
    vgg_weights: str | None = "IMAGENET1K_V1"
    face_model: str = "buffalo_l"
    face_root: str | None = None
    gram_scale: float = 1e6
    segmenter: Callable | None = None
    batch_size: int = 16
    device: str = "cpu"
    progress: bool = True
    models: dict = field(default_factory=dict)  # "clip" / "dino" / "blip" / "vgg" / "face" -> built object


def parse_metric_names(text: str | Sequence[str]) -> list[str]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ConfigError(f"--metrics {','.join(names)!r}: unknown {', '.join(unknown) or 'empty list'}; "
                          f"choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def build_metrics(names: Sequence[str], s: MetricSettings) -> dict[str, Metric]:
    """One metric object per name; CLIP-T and CLIP-I share one CLIP model."""
    common = {"batch_size": s.batch_size, "device": s.device, "progress": s.progress}
    fidelity = {"segmenter": s.segmenter}
    m = s.models
    makers = {
        "clip_t": lambda: METRICS["clip_t"](s.clip_model, s.clip_pretrained, clip=m.get("clip"), **common),
        "clip_i": lambda: METRICS["clip_i"](s.clip_model, s.clip_pretrained, clip=m.get("clip"), **fidelity, **common),
        "dino_i": lambda: METRICS["dino_i"](s.dino_model, dino=m.get("dino"), **fidelity, **common),
        "blip_t": lambda: METRICS["blip_t"](s.blip_model, blip=m.get("blip"), **common),
        "gram_d": lambda: METRICS["gram_d"](s.vgg_weights, vgg=m.get("vgg"), scale=s.gram_scale, **common),
        "face_sim": lambda: METRICS["face_sim"](s.face_model, root=s.face_root, embedder=m.get("face"), **common),
    }
    return {name: makers[name]() for name in parse_metric_names(names)}


def _slug(index: int, k: int) -> str:
    return f"{index:03d}_{k}.png"


def generate_rows(
    pipe,
    prompts: Sequence[EvalPrompt],
    images_dir: str | Path,
    num_images: int = 1,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    resolution: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Generate ``num_images`` per prompt into ``images_dir`` and write its ``manifest.csv``."""
    from tqdm.auto import tqdm

    from .pipelines import generate

    images_dir = Path(images_dir)
    rows = []
    per_subject: dict[str, int] = defaultdict(int)
    for p in tqdm(prompts, desc="generating", disable=not progress):
        index = per_subject[p.subject]
        per_subject[p.subject] += 1
        images = generate(pipe, p.prompt, num_images, steps, guidance, seed, resolution, resolution)
        for k, image in enumerate(images):
            rel = Path(p.subject) / _slug(index, k)
            (images_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            image.save(images_dir / rel)
            rows.append({"file": rel.as_posix(), "subject": p.subject, "prompt": p.prompt, "category": p.category,
                         "seed": seed + k})
    write_csv(images_dir / MANIFEST, rows)
    return rows


def read_manifest(images_dir: str | Path, prompts: Sequence[EvalPrompt]) -> list[dict]:
    """Rows of an existing images folder; subject/category filled from the benchmark where missing."""
    images_dir = Path(images_dir)
    path = images_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: missing; a folder of images needs a manifest.csv with columns "
                        "file,prompt[,subject,category]")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"file", "prompt"} <= set(rows[0]):
        raise DataError(f"{path}: needs columns file and prompt (optional: subject, category)")
    by_prompt = {p.prompt: p for p in prompts}
    subjects = {p.subject for p in prompts}
    for row in rows:
        known = by_prompt.get(row["prompt"])
        if not row.get("subject"):
            if known is None and len(subjects) != 1:
                raise DataError(f"{path}: row {row['file']!r} has no subject and its prompt is not in the benchmark; "
                                "add a subject column")
            row["subject"] = known.subject if known else next(iter(subjects))
        if not row.get("category"):
            row["category"] = known.category if known else "other"
        if not (images_dir / row["file"]).is_file():
            raise DataError(f"{path}: listed image {row['file']!r} not found in {images_dir}")
    return rows


def _subject_masks(reference_masks: str | Path | None, subject: str, refs: Sequence[Path]):
    if reference_masks is None:
        return None
    root = Path(reference_masks)
    folder = root / subject if (root / subject).is_dir() else root
    return mask_files_for(refs, folder)


def score_rows(
    rows: list[dict],
    images_dir: str | Path,
    prompts: Sequence[EvalPrompt],
    metrics: dict[str, Metric],
    reference_masks: str | Path | None = None,
) -> list[dict]:
    """Add one column per metric to every row (in place) and return the rows."""
    images_dir = Path(images_dir)
    refs_by_subject = {p.subject: p.references for p in prompts}
    by_subject: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_subject[row["subject"]].append(i)
    for subject, indices in by_subject.items():
        images = [load_image(images_dir / rows[i]["file"]) for i in indices]
        texts = [rows[i]["prompt"] for i in indices]
        refs = refs_by_subject.get(subject)
        for name, metric in metrics.items():
            if metric.needs == "prompts":
                values = metric.update(images, texts)
            else:
                if not refs:
                    raise DataError(f"{name}: no references for subject {subject!r}; check --data")
                ref_images = [load_image(r) for r in refs]
                if name in ("clip_i", "dino_i"):
                    values = metric.update(images, ref_images,
                                           reference_masks=_subject_masks(reference_masks, subject, refs))
                else:
                    values = metric.update(images, ref_images)
            for i, v in zip(indices, values.tolist()):
                rows[i][name] = float(v)
    return rows


def _mean(values: list[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return sum(good) / len(good) if good else float("nan")


def summarize(rows: Sequence[dict], metric_names: Sequence[str]) -> list[dict]:
    """Mean of each metric overall, per category and per subject (``group`` = overall/category/subject)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[("overall", "all")].append(row)
        groups[("category", row["category"])].append(row)
        groups[("subject", row["subject"])].append(row)
    out = []
    for (kind, name), members in groups.items():
        entry = {"group": kind, "name": name, "images": len(members), "share": len(members) / len(rows)}
        entry.update({m: _mean([float(r[m]) for r in members]) for m in metric_names})
        out.append(entry)
    order = {"overall": 0, "category": 1, "subject": 2}
    return sorted(out, key=lambda e: (order[e["group"]], e["name"]))


def write_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
