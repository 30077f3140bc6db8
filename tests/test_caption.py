"""`accord caption`: template mode, trigger insertion, the no-overwrite rule, and a tiny VLM's plumbing."""

from __future__ import annotations

import argparse

import pytest
from PIL import Image

from accord import caption
from accord.commands import caption as caption_cli
from accord.data.captions import split_caption
from accord.errors import ConfigError


def _folder(tmp_path, n=2):
    folder = tmp_path / "refs"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(folder / f"{i:02d}.png")
    return folder


def _run(argv):
    parser = argparse.ArgumentParser()
    caption_cli.add_arguments(parser)
    return caption_cli.run(parser.parse_args(argv))


def test_template_mode_writes_sidecars_and_keeps_existing(tmp_path, capsys):
    folder = _folder(tmp_path)
    (folder / "01.txt").write_text("my own caption, 1 sks dog\n")
    assert _run([str(folder), "--trigger", "sks", "--class", "dog", "--template", "--phrase", "on grass",
                 "--no-progress"]) == 0
    assert (folder / "00.txt").read_text() == "1 sks dog, on grass\n"
    assert (folder / "01.txt").read_text() == "my own caption, 1 sks dog\n"  # never overwritten
    assert "skipped 1" in capsys.readouterr().out
    assert _run([str(folder), "--trigger", "sks", "--class", "dog", "--template", "a {trigger} {class_noun}",
                 "--overwrite", "--no-progress"]) == 0
    assert (folder / "01.txt").read_text() == "a sks dog\n"
    assert split_caption((folder / "00.txt").read_text(), "sks") == ("a sks dog", "")


def test_insert_trigger_and_clean_caption():
    assert caption.insert_trigger("1 dog, running, sea", "sks", "dog") == "1 sks dog, running, sea"
    assert caption.insert_trigger("a beach, sunset", "<new1>", "dog") == "1 <new1> dog, a beach, sunset"
    assert caption.insert_trigger("1 sks dog, sea", "sks", "dog") == "1 sks dog, sea"
    assert caption.clean_caption("Prompt: 1 Dog, Running,, Sea, sea.\n", "sks", "dog") == "1 sks dog, running, sea"
    assert caption.clean_caption('"stuffed animal on a bed"', "sks", "stuffed animal") == "sks stuffed animal on a bed"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"trigger": "two words", "class_noun": "dog"}, "whitespace"),
        ({"trigger": "sks", "class_noun": " "}, "class"),
        ({"trigger": "sks", "class_noun": "dog", "template": "a {class_noun}"}, "trigger"),
        ({"trigger": "sks", "class_noun": "dog", "template": "a {foo}"}, "placeholder"),
        ({"trigger": "sks", "class_noun": "dog"}, "model or --template"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        caption.caption_folder(_folder(tmp_path), progress=False, **kwargs)


def test_injected_captioner_gets_appendix_o_prompt(tmp_path):
    folder = _folder(tmp_path)
    seen = []

    def fake(image, instruction):
        seen.append(instruction)
        return "1 teapot, kitchen table, morning light"

    done = caption.caption_folder(folder, "sks", "teapot", fake, progress=False)
    assert len(done["written"]) == 2
    assert seen[0].startswith("You are an excellent prompt engineer") and seen[0].endswith("are: teapot")
    assert (folder / "00.txt").read_text() == "1 sks teapot, kitchen table, morning light\n"


def test_tiny_vlm_from_a_local_folder(tmp_path):
    """Plumbing only: a random-weight BLIP captioner loaded by path writes gibberish that holds the trigger."""
    from accord.eval.tiny import save_tiny_captioner

    model_dir = save_tiny_captioner(tmp_path / "vlm")
    folder = _folder(tmp_path)
    assert _run([str(folder), "--trigger", "sks", "--class", "dog", "--model", str(model_dir),
                 "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]) == 0
    for i in range(2):
        text = (folder / f"{i:02d}.txt").read_text().strip()
        assert "sks dog" in text and text == text.lower()


def test_missing_vlm_is_one_line(monkeypatch):
    from accord.errors import ModelLoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="captioning model") as info:
        caption.VLMCaptioner("/nonexistent/vlm")
    assert "\n" not in str(info.value)
