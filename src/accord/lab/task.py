"""Lab tasks: a personal subject and what always shares its pictures, read from a YAML file.

A task says who the subject is (trigger, class noun, shape, colour, pattern), which concepts are coupled
with it, the reference scenes (listed, or drawn by a compact generator), how each reference is captioned,
the evaluation prompts with their categories, and what the detector must see in an image for it to count
as a *leak*. The format is documented key by key in docs/lab.md; the shipped tasks are in
``accord/lab/tasks/*.yaml``.

The default task is ``object-object`` (the paper's Fig. 1): ``sks circle`` — a red *checkered* circle (a
pattern the base model never saw; its superclass "circle" is a known word) — always stands next to a
yellow triangle, and each caption names both, so plain fine-tuning binds the triangle to the trigger. Its
prompts, categories (Appendix H) and seeds were fixed before any method was run and are not to be changed
after seeing results (``protocol_version`` records that). The module-level names (``TRIGGER``, ``SUBJECT``,
``PROMPTS``, :func:`reference_scenes`, ...) are that task's.
"""

from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .world import BACKGROUNDS, COLORS, PATTERNS, PLACES, SHAPES, SIZE, Obj, Scene, caption, parse_caption, render

__all__ = ["TASKS_DIR", "DEFAULT_TASK", "Task", "Subject", "Captions", "Leak", "EvalPrompt", "load_task",
           "shipped_tasks", "default_task",
           "TRIGGER", "CLASS_NOUN", "SUBJECT", "COUPLED", "PROMPTS", "CATEGORIES", "SEEDS", "PROTOCOL_VERSION",
           "reference_scenes", "reference_caption", "write_references", "write_masked_references", "names"]

TASKS_DIR = Path(__file__).parent / "tasks"
DEFAULT_TASK = "object-object"
LEAK_KINDS = ("object", "background", "subject", "others")
LEAK_WHEN = ("unasked", "asked_otherwise")
CAPTION_OBJECTS = ("full", "color", "shape", "omit")


@dataclass(frozen=True)
class Subject:
    trigger: str
    class_noun: str
    shape: str
    color: str
    pattern: str

    @property
    def obj(self) -> Obj:
        return Obj(self.shape, self.color, self.pattern)


@dataclass(frozen=True)
class Captions:
    """How a reference is captioned: the subject as ``"<trigger> <class_noun>"``, then the other objects
    (``full``: colour, pattern and shape; ``color``: colour and shape; ``shape``: the shape word only;
    ``omit``: not named), then the background (``"<colour> background"``) if ``background``. ``mention`` is the
    fraction of references captioned so; the others carry the subject's phrase alone, as a template caption
    ("a photo of sks dog") does, spread evenly over the references (:meth:`in_full`). ``general`` is what DDLoss
    is told is the other concepts c_g of each reference: ``caption`` (the caption's other phrases) or ``scene``
    (every other object in full with its place, and the background, whatever the caption says; written as
    ``metadata.jsonl``'s ``general``, as a user or a captioner lists what shares the picture)."""
    objects: str = "full"
    places: bool = False
    background: bool = True
    mention: float = 1.0
    general: str = "caption"

    def in_full(self, index: int) -> bool:
        """Whether reference ``index`` is captioned by the rule rather than with the subject's phrase alone: the
        i-th of n references is when ``floor((i+1)·mention) > floor(i·mention)``, so round(n·mention) of them are,
        evenly spread (mention 0.6 over 5: references 1, 3 and 4)."""
        return math.floor((index + 1) * self.mention + 1e-9) > math.floor(index * self.mention + 1e-9)


@dataclass(frozen=True)
class Leak:
    """What counts as a leak in one image (see docs/lab.md): ``kind`` says where the detector looks, the
    attribute keys what it must find there, ``when`` which prompts are counted."""
    kind: str
    shape: str | None = None
    color: str | None = None
    pattern: str | None = None
    place: str | None = None
    background: str | None = None
    when: str = "unasked"
    description: str = ""

    def _match(self) -> dict[str, str]:
        return {k: getattr(self, k) for k in ("color", "pattern", "place") if getattr(self, k) is not None}

    def _ask(self, asked: dict, subject: str) -> tuple[bool, bool]:
        """(asks the coupled value, asks another value of the same attribute) for a parsed prompt."""
        objs = asked["objects"]
        if self.kind == "object":
            return self.shape in objs, False
        if self.kind == "background":
            return asked["background"] == self.background, asked["background"] not in (None, self.background)
        if self.kind == "subject":
            want = objs.get(subject, {})
            return (all(want.get(k) == v for k, v in self._match().items()),
                    any(want.get(k) not in (None, v) for k, v in self._match().items()))
        others = [w for s, w in objs.items() if s != subject]  # kind others
        return any(all(w.get(k) == v for k, v in self._match().items()) for w in others), False

    def counted(self, asked: dict, subject: str) -> bool:
        """Whether a prompt (parsed) counts toward the leak rate."""
        yes, otherwise = self._ask(asked, subject)
        return otherwise if self.when == "asked_otherwise" else not yes

    def seen(self, detected: dict, subject: str) -> bool:
        """Whether the detector's labels of one image show the coupled concept."""
        objs, match = detected["objects"], self._match()
        if self.kind == "object":
            got = objs.get(self.shape)
            return got is not None and all(got[k] == v for k, v in match.items())
        if self.kind == "background":
            return detected["background"] == self.background
        if self.kind == "subject":
            got = objs.get(subject)
            return got is not None and all(got[k] == v for k, v in match.items())
        return any(all(got[k] == v for k, v in match.items()) for s, got in objs.items() if s != subject)

    def measure(self, asked: dict, detected: dict, subject: str) -> float:
        return float(self.counted(asked, subject) and self.seen(detected, subject))


@dataclass(frozen=True)
class EvalPrompt:
    category: str
    text: str
    leak_counted: bool = True  # False: the prompt asks for the coupled concept (or, for ``when: asked_otherwise``,
    #                            asks nothing about its attribute), so no leak is counted on its images

    @property
    def asks_coupled(self) -> bool:
        return not self.leak_counted


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    description: str
    subject: Subject
    coupled: tuple  # ((name, Obj), ...): the concepts that share the subject's pictures
    scenes: tuple  # the reference scenes
    captions: Captions
    prompts: tuple  # EvalPrompt, in order
    categories: tuple
    leak: Leak
    seeds: tuple = (0, 1, 2, 3, 4)
    protocol_version: int = 1
    source: str = ""

    # --- names used by the runner
    @property
    def trigger(self) -> str:
        return self.subject.trigger

    @property
    def class_noun(self) -> str:
        return self.subject.class_noun

    def names(self, trigger: str | None = None) -> dict[str, str]:
        """Trigger → shape, for :func:`accord.lab.world.parse_caption`."""
        return {trigger or self.trigger: self.subject.shape}

    def reference_scenes(self) -> list[Scene]:
        return list(self.scenes)

    def reference_caption(self, scene: Scene, index: int = 0) -> str:
        subject = scene.find(self.subject.shape)
        rest = self.general_caption(scene, index)
        head = caption(Scene(scene.background, (subject,)), places=self.captions.places, background=False,
                       names={self.subject.shape: f"{self.trigger} {self.class_noun}"})
        return ", ".join(p for p in (head, rest) if p)

    def general_caption(self, scene: Scene, index: int = 0) -> str:
        """The caption of everything but the subject (Break-A-Scene's ``general`` context) of reference ``index``."""
        style = self.captions
        if not style.in_full(index):
            return ""
        others = [o for o in scene.objects if o.shape != self.subject.shape]
        if style.objects == "omit":
            others = []
        elif style.objects == "shape":
            others = [replace(o, color="", pattern="solid") for o in others]
        elif style.objects == "color":
            others = [replace(o, pattern="solid") for o in others]
        text = caption(Scene(scene.background, tuple(others)), places=style.places, background=style.background)
        return " ".join(text.split())  # ``shape`` leaves an empty colour word

    def scene_general(self, scene: Scene) -> str:
        """Everything but the subject, named in full with places (``captions.general: scene``)."""
        others = tuple(o for o in scene.objects if o.shape != self.subject.shape)
        return caption(Scene(scene.background, others), places=True, background=True)

    def write_references(self, folder: Path, trigger: str | None = None) -> Path:
        """PNG + ``.txt`` caption sidecars, e.g. ``"sks circle, yellow triangle, blue background"`` (``trigger``
        in place of the task's), and with ``captions.general: scene`` a ``metadata.jsonl`` giving each image's
        ``general``. Files already holding the same bytes are left alone, and the others replaced whole, so runs in
        parallel processes can write and read one references folder."""
        import json

        folder.mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(self.scenes):
            _put(folder / f"{i:02d}.png", _png(render(scene)))
            text = self.reference_caption(scene, i)
            if trigger:
                text = text.replace(f"{self.trigger} ", f"{trigger} ")
            _put(folder / f"{i:02d}.txt", (text + "\n").encode())
        if self.captions.general == "scene":
            lines = [json.dumps({"file_name": f"{i:02d}.png", "general": self.scene_general(scene)})
                     for i, scene in enumerate(self.scenes)]
            _put(folder / "metadata.jsonl", ("\n".join(lines) + "\n").encode())
        else:  # the lab's own file from a run with ``scene``: it would tell DDLoss more than this task's captions
            (folder / "metadata.jsonl").unlink(missing_ok=True)
        return folder

    def write_masked_references(self, folder: Path, token: str) -> Path:
        """The references for Break-A-Scene: ``metadata.jsonl`` names one mask per image, the subject's exact
        pixels, under ``token``; everything else is the image's ``general`` context."""
        import json

        import numpy as np

        from .world import mask_of

        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, scene in enumerate(self.scenes):
            _put(folder / f"{i:02d}.png", _png(render(scene)))
            subject = scene.find(self.subject.shape)
            mask = np.where(mask_of(subject), 255, 0).astype(np.uint8).reshape(SIZE, SIZE)
            _put(folder / f"m{i:02d}.png", _png(mask))
            general = self.general_caption(scene, i)
            text = ", ".join(p for p in (f"a photo of {token}", general) if p)
            _put(folder / f"{i:02d}.txt", (text + "\n").encode())  # the same caption, for the dependence shift
            lines.append(json.dumps({"file_name": f"{i:02d}.png", "caption": text, "general": general,
                                     "masks": {token: f"m{i:02d}.png"}}))
        _put(folder / "metadata.jsonl", ("\n".join(lines) + "\n").encode())
        return folder

    def prompt_text(self, p: EvalPrompt, trigger: str) -> str:
        """The prompt with the method's trigger in place of the task's."""
        return p.text.replace(f"{self.trigger} ", f"{trigger} ")

    def class_prompt(self, p: EvalPrompt) -> str:
        """The prompt with the class noun alone (for mini-CLIP-T)."""
        return p.text.replace(f"{self.trigger} ", "")

    def score(self, prompt: str, detected: dict, trigger: str | None = None) -> dict[str, float]:
        """Leak, text accuracy and fidelity of one image (``prompt`` carries ``trigger``)."""
        from .judge import score

        return score(prompt, detected, names=self.names(trigger), coupled=self.leak.shape or "",
                     subject=self.subject.shape, subject_pattern=self.subject.pattern, leak=self.leak)


def _png(pixels) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _put(path: Path, data: bytes) -> None:
    """Write ``data`` unless ``path`` already holds it; replaced whole (a reader never sees half a file)."""
    import os

    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- loading

class _Reader:
    """Walks a parsed YAML mapping; every complaint is one line naming the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {problem}" if key else f"{self.path}: {problem}")

    def mapping(self, value: Any, key: str, allowed: tuple, required: tuple = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping of {', '.join(allowed)}, got {_kind(value)}")
        for k in value:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"choose from {', '.join(allowed)}"
                raise self.fail(_join(key, k), f"unknown key; {hint}")
        for k in required:
            if k not in value or value[k] is None:
                raise self.fail(_join(key, k), "missing; add it (docs/lab.md lists every key)")
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {_kind(value)}")
        return value.strip()

    def word(self, value: Any, key: str) -> str:
        text = self.text(value, key)
        if len(text.split()) != 1 or "," in text:
            raise self.fail(key, f"{text!r} must be a single word without commas")
        return text

    def choice(self, value: Any, key: str, options, what: str) -> str:
        if value not in tuple(options):
            raise self.fail(key, f"{value!r} is not {what}; choose one of {', '.join(options)}")
        return value

    def flag(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_kind(value)}")
        return value

    def fraction(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise self.fail(key, f"expected a number in (0, 1], got {value!r}")
        return float(value)

    def integer(self, value: Any, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(key, f"expected a whole number from {lo} to {hi}, got {value!r}")
        return value


def _join(key: str, sub) -> str:
    return f"{key}.{sub}" if key else str(sub)


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]


_ATTRS = {"shape": (SHAPES, "a shape"), "color": (tuple(COLORS), "an object colour"),
          "pattern": (PATTERNS, "a pattern"), "place": (PLACES, "a place")}
_OBJ_KEYS = ("use", "shape", "color", "pattern", "place", "size", "dx", "dy")
_NUMS = {"size": (4, SIZE), "dx": (-8, 8), "dy": (-8, 8)}


def _object(r: _Reader, raw: Any, key: str, concepts: dict[str, Obj], rng: random.Random | None,
            taken: dict[str, set]) -> Obj:
    """One reference object; in a generator (``rng``) a list value is a choice, avoiding ``taken`` shapes/places."""
    raw = r.mapping(raw, key, _OBJ_KEYS)
    base: dict = {}
    if "use" in raw:
        name = r.choice(raw["use"], _join(key, "use"), list(concepts), "the subject or a coupled concept")
        o = concepts[name]
        base = {"shape": o.shape, "color": o.color, "pattern": o.pattern}
    values = {**base, **{k: v for k, v in raw.items() if k != "use"}}
    out: dict = {}
    for k in ("shape", "color", "pattern", "place", "size", "dx", "dy"):
        if k not in values:
            if k in ("shape", "color"):
                raise r.fail(_join(key, k), "missing; name it, or `use:` the subject or a coupled concept")
            continue
        v, where = values[k], _join(key, k)
        if rng is not None and isinstance(v, list):
            if not v:
                raise r.fail(where, "an empty list; give at least one choice")
            options = [x for x in v if x not in taken.get(k, set())]
            if not options:
                raise r.fail(where, f"every choice in {v} is taken by an earlier object of the scene; add another")
            v = rng.choice(options)
        if k in _ATTRS:
            out[k] = r.choice(v, where, *_ATTRS[k])
        else:
            out[k] = r.integer(v, where, *_NUMS[k])
    return Obj(**out)


def _scene(r: _Reader, background: Any, objects: Any, key: str, concepts, subject: Subject,
           rng: random.Random | None = None) -> Scene:
    if rng is not None and isinstance(background, list) and background:
        background = rng.choice(background)
    bg = r.choice(background, _join(key, "background"), list(BACKGROUNDS), "a background colour")
    if not isinstance(objects, list) or not objects:
        raise r.fail(_join(key, "objects"), f"expected a list of objects, got {_kind(objects)}")
    objs: list[Obj] = []
    taken: dict[str, set] = {"shape": set(), "place": set(), "color": {bg}}  # a drawn colour is not the background's
    for j, raw in enumerate(objects):
        o = _object(r, raw, f"{key}.objects[{j}]", concepts, rng, taken)
        if o.shape in taken["shape"]:
            raise r.fail(f"{key}.objects[{j}].shape", f"a second {o.shape}; the detector has one slot per shape, "
                         "so give each object of a scene its own shape")
        taken["shape"].add(o.shape)
        if o.place != "center":
            taken["place"].add(o.place)
        objs.append(o)
    if sum(o.shape == subject.shape and (o.color, o.pattern) == (subject.color, subject.pattern) for o in objs) != 1:
        raise r.fail(_join(key, "objects"), f"no subject; add `- use: subject` (the {subject.color} "
                     f"{subject.pattern} {subject.shape})")
    return Scene(bg, tuple(objs))


def _references(r: _Reader, raw: Any, concepts, subject: Subject) -> tuple:
    raw = r.mapping(raw, "references", ("scenes", "generate"))
    if ("scenes" in raw) == ("generate" in raw):
        raise r.fail("references", "give exactly one of `scenes:` (a list) or `generate:` (a generator spec)")
    if "scenes" in raw:
        if not isinstance(raw["scenes"], list) or not raw["scenes"]:
            raise r.fail("references.scenes", f"expected a list of scenes, got {_kind(raw['scenes'])}")
        out = []
        for i, s in enumerate(raw["scenes"]):
            s = r.mapping(s, f"references.scenes[{i}]", ("background", "objects"), ("background", "objects"))
            out.append(_scene(r, s["background"], s["objects"], f"references.scenes[{i}]", concepts, subject))
        return tuple(out)
    g = r.mapping(raw["generate"], "references.generate", ("count", "seed", "background", "objects"),
                  ("count", "background", "objects"))
    count = r.integer(g["count"], "references.generate.count", 1, 100)
    rng = random.Random(r.integer(g.get("seed", 0), "references.generate.seed", 0, 2 ** 31))
    return tuple(_scene(r, g["background"], g["objects"], "references.generate", concepts, subject, rng)
                 for _ in range(count))


def _leak(r: _Reader, raw: Any, subject: Subject, coupled: dict[str, Obj]) -> Leak:
    keys = tuple(f.name for f in fields(Leak))
    raw = r.mapping(raw, "leak", keys, ("kind",))
    kind = r.choice(raw["kind"], "leak.kind", LEAK_KINDS, "a leak kind")
    when = r.choice(raw.get("when", "unasked"), "leak.when", LEAK_WHEN, "a counting rule")
    values = {k: r.choice(raw[k], f"leak.{k}", *_ATTRS[k]) for k in _ATTRS if k in raw}
    if "background" in raw:
        values["background"] = r.choice(raw["background"], "leak.background", list(BACKGROUNDS), "a background colour")
    need = {"object": ("shape",), "background": ("background",), "subject": (), "others": ()}[kind]
    allowed = {"object": ("shape", "color", "pattern", "place"), "background": ("background",),
               "subject": ("color", "pattern", "place"), "others": ("color", "pattern", "place")}[kind]
    for k in need:
        if k not in values:
            raise r.fail(f"leak.{k}", f"missing; leak kind {kind!r} needs it")
    for k in values:
        if k not in allowed:
            raise r.fail(f"leak.{k}", f"does not apply to leak kind {kind!r}; it takes {', '.join(allowed)}")
    if kind in ("subject", "others") and not values:
        raise r.fail("leak", f"kind {kind!r} needs at least one of color, pattern, place (what the detector must see)")
    if when == "asked_otherwise" and kind not in ("background", "subject"):
        raise r.fail("leak.when", f"asked_otherwise needs kind background or subject (an attribute a prompt can ask "
                     f"another value of), not {kind!r}; use when: unasked")
    if kind == "object" and values["shape"] == subject.shape:
        raise r.fail("leak.shape", f"{subject.shape!r} is the subject's shape; name the coupled object's shape")
    desc = raw.get("description", "")
    desc = r.text(desc, "leak.description") if desc else ""
    return Leak(kind=kind, when=when, description=desc, **values)


def load_task(path: str | Path) -> Task:
    """Read and check a task file; a shipped task may be given by name (``subject-background``)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        shipped = TASKS_DIR / f"{path}.yaml"
        if str(path) in shipped_tasks() and shipped.is_file():
            p = shipped
        else:
            raise ConfigError(f"--task {path}: no such file; give a task YAML file (docs/lab.md) or a shipped task: "
                              f"{', '.join(shipped_tasks())}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text; save the task file as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    r = _Reader(p)
    top = ("name", "kind", "description", "protocol_version", "subject", "coupled", "references", "captions",
           "prompts", "categories", "leak", "seeds")
    data = r.mapping(data, "", top, ("name", "subject", "references", "prompts", "leak"))
    s = r.mapping(data["subject"], "subject", ("trigger", "class_noun", "shape", "color", "pattern"),
                  ("trigger", "class_noun", "shape", "color", "pattern"))
    subject = Subject(trigger=r.word(s["trigger"], "subject.trigger"),
                      class_noun=r.word(s["class_noun"], "subject.class_noun"),
                      shape=r.choice(s["shape"], "subject.shape", *_ATTRS["shape"]),
                      color=r.choice(s["color"], "subject.color", *_ATTRS["color"]),
                      pattern=r.choice(s["pattern"], "subject.pattern", *_ATTRS["pattern"]))
    coupled: dict[str, Obj] = {}
    raw_coupled = data.get("coupled") or {}
    if not isinstance(raw_coupled, dict):
        raise r.fail("coupled", f"expected a mapping of name: {{shape, color, pattern}}, got {_kind(raw_coupled)}")
    for name, c in raw_coupled.items():
        if name == "subject":
            raise r.fail(f"coupled.{name}", "`subject` is taken; give the coupled concept another name")
        c = r.mapping(c, f"coupled.{name}", ("shape", "color", "pattern"), ("shape", "color"))
        coupled[str(name)] = Obj(**{k: r.choice(v, f"coupled.{name}.{k}", *_ATTRS[k]) for k, v in c.items()})
    concepts = {"subject": subject.obj, **coupled}
    scenes = _references(r, data["references"], concepts, subject)
    cap = r.mapping(data.get("captions") or {}, "captions", ("objects", "places", "background", "mention", "general"))
    captions = Captions(objects=r.choice(cap.get("objects", "full"), "captions.objects", CAPTION_OBJECTS,
                                         "a naming rule"),
                        places=r.flag(cap.get("places", False), "captions.places"),
                        background=r.flag(cap.get("background", True), "captions.background"),
                        mention=r.fraction(cap.get("mention", 1.0), "captions.mention"),
                        general=r.choice(cap.get("general", "caption"), "captions.general", ("caption", "scene"),
                                         "a source of c_g"))
    leak = _leak(r, data["leak"], subject, coupled)
    if not isinstance(data["prompts"], list) or not data["prompts"]:
        raise r.fail("prompts", f"expected a list of [category, prompt] pairs, got {_kind(data['prompts'])}")
    pairs = []
    for i, item in enumerate(data["prompts"]):
        if not (isinstance(item, list) and len(item) == 2):
            raise r.fail(f"prompts[{i}]", f"expected [category, prompt], e.g. [background, \"{subject.trigger} "
                         f"{subject.class_noun}, green background\"], got {_kind(item)}")
        category, text = r.word(item[0], f"prompts[{i}][0]"), r.text(item[1], f"prompts[{i}][1]")
        if f"{subject.trigger} " not in f"{text} ":
            raise r.fail(f"prompts[{i}][1]", f"{text!r} does not name the subject; write `{subject.trigger} "
                         f"{subject.class_noun}` in it")
        pairs.append((category, text))
    categories = data.get("categories")
    if categories is None:
        categories = list(dict.fromkeys(c for c, _ in pairs))
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise r.fail("categories", f"expected a list of category names, got {_kind(categories)}")
    for i, (c, _) in enumerate(pairs):
        if c not in categories:
            raise r.fail(f"prompts[{i}][0]", f"category {c!r} is not in categories ({', '.join(categories)}); add it")
    names = {subject.trigger: subject.shape}
    prompts = tuple(EvalPrompt(c, t, leak.counted(parse_caption(t, names), subject.shape)) for c, t in pairs)
    if not any(p.leak_counted for p in prompts):
        raise r.fail("prompts", "no prompt counts toward the leak rate; add prompts that do not ask for the "
                     "coupled concept (see leak.when)")
    seeds = data.get("seeds", [0, 1, 2, 3, 4])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                           for x in seeds):
        raise r.fail("seeds", f"expected a list of non-negative whole numbers, got {_kind(seeds)}")
    kind = r.text(data.get("kind", "custom"), "kind")
    desc = data.get("description", "")
    return Task(name=r.word(data["name"], "name"), kind=kind, description=r.text(desc, "description") if desc else "",
                subject=subject, coupled=tuple(coupled.items()), scenes=scenes, captions=captions, prompts=prompts,
                categories=tuple(categories), leak=leak, seeds=tuple(seeds),
                protocol_version=r.integer(data.get("protocol_version", 1), "protocol_version", 1, 10 ** 6),
                source=str(p))


def shipped_tasks() -> list[str]:
    """Names of the task files shipped in ``accord/lab/tasks``."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def default_task() -> Task:
    return _DEFAULT


_DEFAULT = load_task(TASKS_DIR / f"{DEFAULT_TASK}.yaml")

# The default task's names, as the lab used them before tasks were files.
PROTOCOL_VERSION = _DEFAULT.protocol_version
TRIGGER = _DEFAULT.trigger
CLASS_NOUN = _DEFAULT.class_noun
SUBJECT = _DEFAULT.subject.obj  # its distinctive look: the checkered pattern
COUPLED = dict(_DEFAULT.coupled)["triangle"]  # the "girl" to the subject's "backpack"
SEEDS = _DEFAULT.seeds  # training seeds; image seeds are derived per (seed, prompt, image)
CATEGORIES = _DEFAULT.categories
PROMPTS = _DEFAULT.prompts


def names() -> dict[str, str]:
    return _DEFAULT.names()


def reference_scenes() -> list[Scene]:
    return _DEFAULT.reference_scenes()


def reference_caption(scene: Scene) -> str:
    return _DEFAULT.reference_caption(scene)


def write_references(folder: Path) -> Path:
    return _DEFAULT.write_references(folder)


def write_masked_references(folder: Path, token: str) -> Path:
    return _DEFAULT.write_masked_references(folder, token)
