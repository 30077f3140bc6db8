"""The coupling task: a personal subject that always comes with a second object (the paper's Fig. 1).

The subject is ``sks circle`` — a red *checkered* circle (a pattern the base model never saw; its
superclass "circle" is a known word). Each of the five references also holds a yellow triangle, and
each caption names both, so plain fine-tuning binds the triangle to the trigger.

The evaluation prompts, their categories (Appendix H) and the seeds were fixed before any method
was run and are not to be changed after seeing results (``PROTOCOL_VERSION`` records that).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .world import Obj, Scene, caption, render

__all__ = ["TRIGGER", "CLASS_NOUN", "SUBJECT", "COUPLED", "PROMPTS", "CATEGORIES", "SEEDS", "PROTOCOL_VERSION",
           "EvalPrompt", "reference_scenes", "write_references", "write_masked_references", "names"]

PROTOCOL_VERSION = 1  # prompts, seeds and metrics as first committed; never edited after results
TRIGGER = "sks"
CLASS_NOUN = "circle"
SUBJECT = Obj("circle", "red", "checkered")  # its distinctive look: the checkered pattern
COUPLED = Obj("triangle", "yellow", "solid")  # the "girl" to the subject's "backpack"
SEEDS = (0, 1, 2, 3, 4)  # training seeds; image seeds are derived per (seed, prompt, image)


def names() -> dict[str, str]:
    """Trigger → shape, for :func:`accord.lab.world.parse_caption`."""
    return {TRIGGER: SUBJECT.shape}


def reference_scenes() -> list[Scene]:
    """Five references: the subject and the coupled object side by side, three backgrounds."""
    layout = [("blue", "left", 12, 0), ("purple", "right", 13, -2), ("gray", "left", 14, 2),
              ("blue", "right", 12, 3), ("purple", "left", 13, -3)]
    out = []
    for bg, place, size, dy in layout:
        other = "right" if place == "left" else "left"
        subject = Obj(SUBJECT.shape, SUBJECT.color, SUBJECT.pattern, place, size=size, dy=dy)
        coupled = Obj(COUPLED.shape, COUPLED.color, COUPLED.pattern, other, size=13, dy=-dy)
        out.append(Scene(bg, (subject, coupled)))
    return out


def reference_caption(scene: Scene) -> str:
    return caption(scene, places=False, names={SUBJECT.shape: f"{TRIGGER} {SUBJECT.shape}"})


def write_references(folder: Path) -> Path:
    """PNG + ``.txt`` caption sidecars, e.g. ``"sks circle, yellow triangle, blue background"``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(reference_scenes()):
        Image.fromarray(render(scene)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(reference_caption(scene) + "\n")
    return folder


def write_masked_references(folder: Path, token: str) -> Path:
    """The same five references for Break-A-Scene: ``metadata.jsonl`` names one mask per image, the subject's
    exact pixels, under ``token``; the coupled object and the background are the image's ``general`` context."""
    import json

    import numpy as np
    from PIL import Image

    from .world import SIZE, mask_of

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, scene in enumerate(reference_scenes()):
        Image.fromarray(render(scene)).save(folder / f"{i:02d}.png")
        subject = scene.find(SUBJECT.shape)
        Image.fromarray(np.where(mask_of(subject), 255, 0).astype(np.uint8).reshape(SIZE, SIZE)).save(folder / f"m{i:02d}.png")
        general = caption(Scene(scene.background, tuple(o for o in scene.objects if o is not subject)), places=False)
        text = f"a photo of {token}, {general}"
        (folder / f"{i:02d}.txt").write_text(text + "\n")  # the same caption, for the dependence-shift measurement
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "caption": text, "general": general,
                                 "masks": {token: f"m{i:02d}.png"}}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@dataclass(frozen=True)
class EvalPrompt:
    category: str
    text: str

    @property
    def asks_coupled(self) -> bool:
        return COUPLED.shape in self.text


CATEGORIES = ("background", "placement", "composition", "attribute")
_P = [
    ("background", "sks circle, green background"),
    ("background", "sks circle, black background"),
    ("background", "sks circle, brown background"),
    ("placement", "sks circle on the left, green background"),
    ("placement", "sks circle on the right, black background"),
    ("placement", "sks circle on the left, brown background"),
    ("composition", "sks circle, blue square, brown background"),
    ("composition", "sks circle, white diamond, gray background"),
    ("composition", "sks circle, green square, black background"),
    ("composition", "sks circle, yellow triangle, green background"),  # asks for the coupled object: no leak counted
    ("attribute", "blue sks circle, gray background"),
    ("attribute", "green sks circle, black background"),
    ("attribute", "white sks circle, brown background"),
]
PROMPTS = tuple(EvalPrompt(c, t) for c, t in _P)
