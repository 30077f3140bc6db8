"""Drawing a report's figure headless: the one place that picks matplotlib's backend, lays out, saves and closes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO


@contextmanager
def saved_figure(target: str | IO[bytes], *, figsize: tuple[float, float], ncols: int = 1, dpi: int = 110,
                 squeeze: bool = True) -> Iterator[tuple]:
    """Yield ``(figure, axes)`` from ``plt.subplots(1, ncols)``; on leaving the block lay it out and write it to
    ``target`` (a path or a binary file) as PNG. The figure is closed either way, so a failed drawing leaks no
    figure into a long bench."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=squeeze)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(target, dpi=dpi, format="png")
    finally:
        plt.close(fig)
