"""Evaluation: metrics (:mod:`.metrics`), benchmarks (:mod:`.benchmarks`), generation and scoring
(:mod:`.harness`, :mod:`.pipelines`), reports (:mod:`.report`), best-step selection (:mod:`.best_step`)
and the ``accord eval`` command (:mod:`.cli`). See docs/eval.md."""

from .metrics import (
    METRICS,
    BLIPTextScore,
    CLIPImageSimilarity,
    CLIPTextScore,
    DINOSimilarity,
    FaceSimilarity,
    GramDistance,
    Metric,
)

__all__ = [
    "METRICS",
    "BLIPTextScore",
    "CLIPImageSimilarity",
    "CLIPTextScore",
    "DINOSimilarity",
    "FaceSimilarity",
    "GramDistance",
    "Metric",
]
