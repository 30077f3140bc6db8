"""The coupled reference set that ``accord quickstart`` (:mod:`accord.commands.quickstart`) trains on: the subject
always comes with a second object, as in the paper's backpack-and-girl example."""

from __future__ import annotations

from pathlib import Path

__all__ = ["draw_coupled_references"]

_SCENES = [("park", (90, 170, 90)), ("street", (150, 150, 150)), ("beach", (230, 210, 150)),
           ("kitchen", (200, 180, 160))]


def draw_coupled_references(folder: Path, size: int = 64) -> Path:
    """Four images of a red 'sks backpack' that is always next to a 'girl' (a face-coloured disc)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, color) in enumerate(_SCENES):
        img = Image.new("RGB", (size, size), color)
        draw = ImageDraw.Draw(img)
        x = 6 + 4 * i
        draw.rounded_rectangle([x, 20, x + 22, 52], radius=5, fill=(200, 30, 40), outline=(90, 10, 10))
        draw.ellipse([x + 28, 14, x + 44, 30], fill=(240, 200, 170))
        draw.rectangle([x + 31, 30, x + 41, 56], fill=(60, 80, 200))
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"1 sks backpack, girl, {scene}\n")
    return folder
