"""Split a reference caption into the personal condition ``c_p`` and the general condition ``c_g``.

Captions are comma-separated phrases, e.g. ``"1 sks backpack, girl, park, sunset"``. The phrase that
holds the trigger (``sks``, ``<new1>``, ``<s*>`` …) is ``c_p`` (``"1 sks backpack"``); the remaining
phrases joined with ``", "`` are ``c_g`` (``"girl, park, sunset"``), see DESIGN.md, "Captions and
conditions". If the trigger appears in several phrases, all of them together (in caption order,
joined with ``", "``) form ``c_p``.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from ..errors import ConfigError, DataError

__all__ = ["default_caption", "join_phrases", "normalize_caption", "split_caption", "split_phrases", "trigger_pattern",
           "vary_caption"]

_SPACE = re.compile(r"\s+")


def split_phrases(caption: str) -> list[str]:
    """The caption's comma-separated phrases, whitespace collapsed, empty phrases dropped."""
    phrases = (_SPACE.sub(" ", p).strip() for p in caption.split(","))
    return [p for p in phrases if p]


def join_phrases(phrases) -> str:
    return ", ".join(phrases)


def normalize_caption(caption: str) -> str:
    """``" a  sks dog ,, park "`` → ``"a sks dog, park"``."""
    return join_phrases(split_phrases(caption))


@lru_cache(maxsize=64)
def trigger_pattern(trigger: str) -> re.Pattern:
    """Whole-word, case-insensitive match of ``trigger``; works for ``sks`` as well as ``<new1>``.

    ``\\b`` cannot be used because triggers may start or end with non-word characters, so the
    neighbours are required not to be word characters instead.
    """
    trigger = trigger.strip() if isinstance(trigger, str) else trigger
    if not isinstance(trigger, str) or not trigger:
        raise ConfigError(f"trigger must be a non-empty word such as 'sks' or '<new1>', got {trigger!r}")
    if _SPACE.search(trigger):
        raise ConfigError(f"trigger {trigger!r} contains whitespace; use a single token such as 'sks'")
    return re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", re.IGNORECASE)


def split_caption(caption: str, trigger: str) -> tuple[str, str]:
    """``(c_p, c_g)`` of a caption; raises :class:`DataError` when no phrase holds the trigger.

    The error message does not know the file; callers add it (see ``scan_references``).
    """
    pattern = trigger_pattern(trigger)
    phrases = split_phrases(caption)
    personal = [p for p in phrases if pattern.search(p)]
    if not personal:
        raise DataError(f"caption {normalize_caption(caption)!r} does not contain the trigger {trigger.strip()!r}")
    general = [p for p in phrases if not pattern.search(p)]
    return join_phrases(personal), join_phrases(general)


def default_caption(trigger: str, class_noun: str) -> str:
    """The caption used when a reference has none: ``"a {trigger} {class_noun}"``."""
    trigger_pattern(trigger)  # validates
    noun = _SPACE.sub(" ", class_noun or "").strip()
    if not noun:
        raise ConfigError("class_noun is empty; set it to the subject's class, e.g. 'backpack' or 'dog'")
    return f"a {trigger.strip()} {noun}"


def vary_caption(caption: str, personal: str, general: str, generator, *, dropout: float = 0.0,
                 shuffle: bool = False, keep: int = 0) -> tuple[str, str, str, bool]:
    """``(caption, c_p, c_g, dropped)`` of one sample under caption dropout and phrase shuffling (kohya's
    ``caption_dropout_rate``, ``shuffle_caption`` and ``keep_tokens``, counted in phrases).

    With probability ``dropout`` the caption and ``c_g`` are empty (``c_p`` is kept for the text-only PDLoss /
    ClassDiffusion terms); such a sample has no DD term. Otherwise, with ``shuffle``, the caption becomes
    ``c_p`` first, then the first ``keep`` other phrases in caption order, then the remaining ones in a random
    order; ``c_g`` follows that order when it is the caption's own other phrases (an explicit metadata
    ``general`` is left as it is). ``generator`` decides both, so a sample depends only on its seed."""
    if dropout > 0 and float(torch.rand((), generator=generator)) < dropout:
        return "", personal, "", True
    if not shuffle:
        return caption, personal, general, False
    personal_phrases = set(split_phrases(personal))
    others = [p for p in split_phrases(caption) if p not in personal_phrases]
    head, tail = others[:keep], others[keep:]
    order = torch.randperm(len(tail), generator=generator).tolist()
    shuffled = head + [tail[i] for i in order]
    own = join_phrases(others) == general
    return join_phrases([personal, *shuffled]), personal, join_phrases(shuffled) if own else general, False

