"""The shared figure helper: a PNG on a clean exit, no PNG and no open figure when drawing fails."""

import io

import matplotlib.pyplot as plt
import pytest
from PIL import Image

from accord.figure import saved_figure


def test_writes_a_png_of_the_asked_panels_and_closes_it(tmp_path):
    before = plt.get_fignums()
    with saved_figure(tmp_path / "f.png", figsize=(4, 2), ncols=2, dpi=50) as (fig, axes):
        assert len(axes) == 2
        axes[0].plot([0, 1], [1, 0])
    assert plt.get_fignums() == before
    assert Image.open(tmp_path / "f.png").size == (200, 100)  # figsize × dpi


def test_writes_to_a_binary_file_with_squeeze_off():
    buffer = io.BytesIO()
    with saved_figure(buffer, figsize=(2, 2), dpi=40, squeeze=False) as (_, axes):
        assert axes.shape == (1, 1)
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_drawing_saves_nothing_and_leaves_no_figure_open(tmp_path):
    before = plt.get_fignums()
    with pytest.raises(ValueError, match="bad data"):
        with saved_figure(tmp_path / "f.png", figsize=(2, 2)):
            raise ValueError("bad data")
    assert plt.get_fignums() == before
    assert not (tmp_path / "f.png").exists()
