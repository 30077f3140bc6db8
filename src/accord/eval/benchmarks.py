"""Benchmarks as lists of :class:`EvalPrompt`: DreamBench, StyleBench-style and generic folders.

DreamBench (Ruiz et al. 2023) is read from its original ``prompts_and_classes.txt``: the
``subject_name,class`` table, then the 25 object and 25 live-subject prompt templates written as
``'a {0} {1} in the jungle'.format(unique_token, class_token)``. Live subjects are the cats and
dogs (DreamBench's convention); every other subject uses the object prompts.

Prompt categories (paper Appendix H, Tab. 11). The paper names four categories and one example of
each but does not publish its per-prompt assignment; :data:`DREAMBENCH_CATEGORIES` is ours. It
follows the paper's four examples exactly and this rule for the rest:

* ``background_replacement`` — the subject stays, the background is named: "… in the background";
* ``situational_placement`` — the subject is put in or on a setting: "in the jungle", "on the
  beach", "on top of a white rug", "on top of green grass with sunflowers around it" (paper's example);
* ``object_composition`` — another object or material is composed with the subject: "floating in
  an ocean of milk" (paper's example), "floating on top of water", "wearing …", "in a … outfit";
* ``attribute_editing`` — the subject itself changes: "a red / purple / shiny / wet / cube shaped …".

With DreamBench's 21 objects and 9 live subjects this gives 20.4 % / 42.0 % / 17.6 % / 20.0 %
(the paper reports 24 / 32 / 24 / 20 %, so its assignment differs in a few situational prompts).
A template not in the table is reported as ``other``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .images import list_images

__all__ = [
    "CATEGORIES",
    "DREAMBENCH_CATEGORIES",
    "LIVE_CLASSES",
    "DreamBench",
    "EvalPrompt",
    "dreambench_prompts",
    "folder_prompts",
    "parse_dreambench",
    "read_prompt_file",
    "stylebench_prompts",
]

CATEGORIES = ("background_replacement", "situational_placement", "object_composition", "attribute_editing")
LIVE_CLASSES = frozenset({"cat", "dog"})

_BR, _SP, _OC, _AE = CATEGORIES
DREAMBENCH_CATEGORIES: dict[str, str] = {
    # shared by object and live-subject prompts
    "a {0} {1} in the jungle": _SP,
    "a {0} {1} in the snow": _SP,
    "a {0} {1} on the beach": _SP,
    "a {0} {1} on a cobblestone street": _SP,
    "a {0} {1} on top of pink fabric": _SP,
    "a {0} {1} on top of a wooden floor": _SP,
    "a {0} {1} with a city in the background": _BR,
    "a {0} {1} with a mountain in the background": _BR,
    "a {0} {1} with a blue house in the background": _BR,
    "a {0} {1} on top of a purple rug in a forest": _SP,
    "a red {0} {1}": _AE,
    "a purple {0} {1}": _AE,
    "a shiny {0} {1}": _AE,
    "a wet {0} {1}": _AE,
    "a cube shaped {0} {1}": _AE,
    # object prompts only
    "a {0} {1} with a wheat field in the background": _BR,
    "a {0} {1} with a tree and autumn leaves in the background": _BR,
    "a {0} {1} with the Eiffel Tower in the background": _BR,
    "a {0} {1} floating on top of water": _OC,
    "a {0} {1} floating in an ocean of milk": _OC,
    "a {0} {1} on top of green grass with sunflowers around it": _SP,
    "a {0} {1} on top of a mirror": _SP,
    "a {0} {1} on top of the sidewalk in a crowded street": _SP,
    "a {0} {1} on top of a dirt road": _SP,
    "a {0} {1} on top of a white rug": _SP,
    # live-subject prompts only
    "a {0} {1} wearing a red hat": _OC,
    "a {0} {1} wearing a santa hat": _OC,
    "a {0} {1} wearing a rainbow scarf": _OC,
    "a {0} {1} wearing a black top hat and a monocle": _OC,
    "a {0} {1} in a chef outfit": _OC,
    "a {0} {1} in a firefighter outfit": _OC,
    "a {0} {1} in a police outfit": _OC,
    "a {0} {1} wearing pink glasses": _OC,
    "a {0} {1} wearing a yellow shirt": _OC,
    "a {0} {1} in a purple wizard outfit": _OC,
}


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to generate and score, with the references its images are compared to."""

    subject: str
    prompt: str
    category: str
    references: tuple[Path, ...]
    template: str = ""
    class_name: str = ""


@dataclass(frozen=True)
class DreamBench:
    classes: dict[str, str]  # subject -> class noun
    object_prompts: tuple[str, ...]  # templates with {0} = unique token, {1} = class noun
    live_prompts: tuple[str, ...]


_TEMPLATE = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")


def parse_dreambench(path: str | Path) -> DreamBench:
    """Parse DreamBench's ``prompts_and_classes.txt`` in its original format."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: DreamBench prompts_and_classes.txt not found; pass the DreamBench folder as --data")
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        low = line.lower()
        if low == "classes":
            section = "classes"
        elif low == "object prompts":
            section = "object"
        elif low == "live subject prompts":
            section = "live"
        elif low == "prompts" or not line or low.startswith(("prompt_list", "]", "subject_name")):
            continue
        elif section == "classes" and "," in line:
            subject, _, noun = line.partition(",")
            classes[subject.strip()] = noun.strip()
        elif section in lists and (m := _TEMPLATE.match(line)):
            lists[section].append(m.group(2))
    if not classes or not lists["object"] or not lists["live"]:
        raise DataError(
            f"{path}: expected a 'Classes' table and 'Object Prompts' / 'Live Subject Prompts' lists "
            "in DreamBench's format"
        )
    return DreamBench(classes, tuple(lists["object"]), tuple(lists["live"]))


def dreambench_prompts(
    root: str | Path,
    subjects: list[str] | None = None,
    token: str = "sks",
    max_prompts: int | None = None,
) -> list[EvalPrompt]:
    """DreamBench prompts for the subjects present under ``root`` (or the given ones)."""
    root = Path(root)
    bench = parse_dreambench(root / "prompts_and_classes.txt")
    if subjects is None:
        subjects = [s for s in bench.classes if (root / s).is_dir()]
        if not subjects:
            raise DataError(f"{root}: no DreamBench subject folders (e.g. {next(iter(bench.classes))}/) found")
    out = []
    for subject in subjects:
        if subject not in bench.classes:
            raise DataError(f"subject {subject!r} is not in {root / 'prompts_and_classes.txt'}; "
                            f"choose from {', '.join(bench.classes)}")
        noun = bench.classes[subject]
        refs = tuple(list_images(root / subject))
        templates = bench.live_prompts if noun in LIVE_CLASSES else bench.object_prompts
        for template in templates[:max_prompts]:
            category = DREAMBENCH_CATEGORIES.get(template, "other")
            out.append(EvalPrompt(subject, template.format(token, noun), category, refs, template, noun))
    return out


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts, one per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found; pass a text file with one prompt per line as --prompts")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise DataError(f"{path}: no prompts (one per line; '#' starts a comment)")
    return prompts


def _fill(prompt: str, token: str, noun: str, path: str | Path) -> str:
    try:
        return prompt.format(token, noun, trigger=token, class_noun=noun)
    except (IndexError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: prompt {prompt!r} has a bad placeholder ({exc}); "
                        "use {0}/{trigger} and {1}/{class_noun}") from None


def folder_prompts(
    references: str | Path,
    prompt_file: str | Path,
    token: str = "sks",
    class_name: str = "",
    max_prompts: int | None = None,
    category: str = "generic",
) -> list[EvalPrompt]:
    """Generic benchmark: one reference folder and a prompt file (``{0}``/``{trigger}``, ``{1}``/``{class_noun}``)."""
    refs = tuple(list_images(references))
    subject = Path(references).resolve().name
    return [
        EvalPrompt(subject, _fill(p, token, class_name, prompt_file), category, refs, p, class_name)
        for p in read_prompt_file(prompt_file)[:max_prompts]
    ]


def stylebench_prompts(
    root: str | Path,
    prompt_file: str | Path,
    styles: list[str] | None = None,
    token: str = "sks",
    max_prompts: int | None = None,
) -> list[EvalPrompt]:
    """StyleBench-style: ``root/<style>/`` reference folders × one prompt list (``{0}`` = trigger,
    ``{1}`` = style name)."""
    root = Path(root)
    if styles is None:
        styles = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if not styles:
            raise DataError(f"{root}: no style folders found; expected ROOT/<style>/ with reference images")
    out = []
    for style in styles:
        out += folder_prompts(root / style, prompt_file, token, style.replace("_", " "), max_prompts, category="style")
    return out
