"""Caption splitting into c_p (the trigger's phrase) and c_g (the rest)."""

from __future__ import annotations

import pytest

from accord.data import default_caption, normalize_caption, split_caption
from accord.errors import ConfigError, DataError


@pytest.mark.parametrize(
    ("caption", "trigger", "personal", "general"),
    [
        ("1 sks backpack, girl, park, sunset", "sks", "1 sks backpack", "girl, park, sunset"),
        ("a sks dog", "sks", "a sks dog", ""),
        ("girl,  park , a SKS   backpack,sunset", "sks", "a SKS backpack", "girl, park, sunset"),
        ("a photo of <new1> cat, on a sofa", "<new1>", "a photo of <new1> cat", "on a sofa"),
        ("a <s*> teapot, kitchen", "<s*>", "a <s*> teapot", "kitchen"),
        ("<S*> teapot,kitchen", "<s*>", "<S*> teapot", "kitchen"),
        ("  a sks\tbackpack ,\n beach,, ", "sks", "a sks backpack", "beach"),
        ("sks backpack, sks on a rock, sunset", "sks", "sks backpack, sks on a rock", "sunset"),
        ("sks-backpack, park", "sks", "sks-backpack", "park"),  # '-' is a word boundary
        ("a sks.", "sks", "a sks.", ""),
    ],
)
def test_split_caption_table(caption, trigger, personal, general):
    assert split_caption(caption, trigger) == (personal, general)


@pytest.mark.parametrize(
    ("caption", "trigger"),
    [
        ("a sksx backpack, park", "sks"),  # not a whole word
        ("a asks backpack", "sks"),
        ("a backpack, park", "sks"),
        ("a <new1 cat", "<new1>"),
        ("a new1 cat", "<new1>"),
        ("", "sks"),
    ],
)
def test_split_caption_without_trigger_raises(caption, trigger):
    with pytest.raises(DataError, match="does not contain the trigger"):
        split_caption(caption, trigger)


@pytest.mark.parametrize("trigger", ["", "  ", "two words", None])
def test_bad_trigger_is_a_config_error(trigger):
    with pytest.raises(ConfigError, match="trigger"):
        split_caption("a sks dog", trigger)


def test_default_caption_and_normalize():
    assert default_caption("sks", "backpack") == "a sks backpack"
    assert default_caption("<new1>", " stuffed  animal ") == "a <new1> stuffed animal"
    assert split_caption(default_caption("sks", "dog"), "sks") == ("a sks dog", "")
    assert normalize_caption(" a  sks dog ,, park ") == "a sks dog, park"
    with pytest.raises(ConfigError, match="class_noun"):
        default_caption("sks", " ")
