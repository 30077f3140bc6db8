"""The lab's world: small RGB scenes rendered from a structured description, with exact labels.

A scene is a background colour and one or two objects (distinct shapes), each with a colour, a
pattern and a place (left, center, right). Its caption uses the paper's comma-separated phrases:
``"red square on the left, yellow striped triangle, green background"``.

The ``checkered`` pattern never occurs in the pretraining corpus (:func:`random_scene` with
``patterns=PRETRAIN_PATTERNS``): it is the distinctive look of the personal subject, so the base
model has never seen it. The detector is trained on all patterns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SIZE", "SHAPES", "COLORS", "BACKGROUNDS", "PATTERNS", "PRETRAIN_PATTERNS", "PLACES",
    "Obj", "Scene", "mask_of", "render", "caption", "random_scene", "random_caption", "parse_caption",
]

SIZE = 32  # pixels; 16x16x4 latents through the lab autoencoder
SHAPES = ("square", "circle", "triangle", "diamond")
COLORS = {  # object colours
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230),
    "yellow": (240, 220, 40), "purple": (150, 60, 200), "white": (245, 245, 245),
}
BACKGROUNDS = {  # darker / muted tones, so an object never vanishes into its background
    "black": (15, 15, 15), "gray": (120, 120, 120), "green": (20, 90, 35),
    "blue": (25, 35, 110), "purple": (70, 30, 90), "brown": (110, 70, 35),
}
PATTERNS = ("solid", "striped", "checkered")
PRETRAIN_PATTERNS = ("solid", "striped")
PLACES = ("left", "center", "right")
_PLACE_X = {"left": 8, "center": 16, "right": 24}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    pattern: str = "solid"
    place: str = "center"
    size: int = 12  # bounding-box side in pixels
    dx: int = 0  # jitter of the centre
    dy: int = 0


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple = field(default_factory=tuple)

    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    def find(self, shape: str) -> Obj | None:
        return next((o for o in self.objects if o.shape == shape), None)


def _mask(shape: str, size: int, cx: float, cy: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    u, v, r = xx - cx, yy - cy, size / 2
    if shape == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if shape == "triangle":  # apex up
        return (v <= r * 0.8) & (v >= -r) & (np.abs(u) <= (v + r) * 0.5)
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def _pattern(pattern: str, color: tuple, cx: float, cy: float) -> np.ndarray:
    base = np.array(color, np.float32)
    other = np.array((20, 20, 20) if sum(color) > 600 else (250, 250, 250), np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if pattern == "solid":
        alt = np.zeros((SIZE, SIZE), bool)
    elif pattern == "striped":  # horizontal bands, 2 px
        alt = ((yy - int(cy)) // 2) % 2 == 1
    elif pattern == "checkered":  # 3 px squares
        alt = (((yy - int(cy)) // 3) + ((xx - int(cx)) // 3)) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    return np.where(alt[..., None], other, base)


def mask_of(o: Obj) -> np.ndarray:
    """The pixels ``o`` covers in a rendered scene (``SIZE x SIZE`` bool; a later object may paint over them)."""
    return _mask(o.shape, o.size, _PLACE_X[o.place] + o.dx, 16 + o.dy)


def render(scene: Scene) -> np.ndarray:
    """The scene as a ``SIZE x SIZE x 3`` uint8 array."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        m = mask_of(o)
        img[m] = _pattern(o.pattern, COLORS[o.color], _PLACE_X[o.place] + o.dx, 16 + o.dy)[m]
    return img.clip(0, 255).astype(np.uint8)


def _phrase(o: Obj, with_place: bool, name: str | None = None) -> str:
    words = [] if name else [o.color]
    if o.pattern != "solid" and not name:
        words.append(o.pattern)
    words.append(name or o.shape)
    text = " ".join(words)
    return f"{text} on the {o.place}" if with_place and o.place != "center" else text


def caption(scene: Scene, *, places: bool | list[bool] = True, background: bool = True,
            names: dict[str, str] | None = None) -> str:
    """Comma-separated phrases: the objects in order, then ``"<colour> background"``.

    ``names`` maps a shape to the phrase that replaces it (e.g. ``{"circle": "sks circle"}``)."""
    flags = places if isinstance(places, list) else [places] * len(scene.objects)
    names = names or {}
    parts = [_phrase(o, f, names.get(o.shape)) for o, f in zip(scene.objects, flags)]
    if background:
        parts.append(f"{scene.background} background")
    return ", ".join(parts)


def random_scene(rng: random.Random, *, patterns=PRETRAIN_PATTERNS, n_objects: int | None = None) -> Scene:
    """A random scene: background, 1-2 objects of distinct shapes, colours unlike the background."""
    bg = rng.choice(list(BACKGROUNDS))
    n = n_objects or rng.choice((1, 2, 2))
    shapes = rng.sample(SHAPES, n)
    places = [rng.choice(PLACES)] if n == 1 else rng.sample(("left", "right"), 2)
    objs = []
    for shape, place in zip(shapes, places):
        color = rng.choice([c for c in COLORS if c != bg])
        pattern = patterns[0] if rng.random() < 0.7 else rng.choice(patterns)
        objs.append(Obj(shape, color, pattern, place, size=rng.randint(11, 14),
                        dx=rng.randint(-2, 2), dy=rng.randint(-4, 4)))
    return Scene(bg, tuple(objs))


def random_caption(rng: random.Random, scene: Scene) -> str:
    """A pretraining caption: places said half of the time, the background 90% of the time, object order shuffled."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    return caption(Scene(scene.background, tuple(objs)), places=[rng.random() < 0.5 for _ in objs],
                   background=rng.random() < 0.9)


def parse_caption(text: str, names: dict[str, str] | None = None) -> dict:
    """What a caption asks for: ``{"background": str|None, "objects": {shape: {color?, pattern?, place?}}}``.

    ``names`` maps a personal phrase back to its shape (``{"sks": "circle"}``): a named object asks for
    its shape only (plus any colour or place the caption adds)."""
    asked: dict = {"background": None, "objects": {}}
    names = names or {}
    for phrase in (p.strip() for p in text.split(",")):
        words = phrase.replace(" on the ", " @").split()
        if len(words) == 2 and words[1] == "background":
            asked["background"] = words[0]
            continue
        want: dict = {}
        shape = None
        for w in words:
            if w.startswith("@"):
                want["place"] = w[1:]
            elif w in COLORS:
                want["color"] = w
            elif w in PATTERNS:
                want["pattern"] = w
            elif w in SHAPES:
                shape = w
        for trigger, s in names.items():
            if trigger in words:
                shape = s
        if shape is not None:
            asked["objects"][shape] = want
    return asked
