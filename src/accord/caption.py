"""``accord caption``: write ``.txt`` caption sidecars for a folder of reference images.

Two modes:

* a vision-language model through transformers (``AutoProcessor`` + ``AutoModelForImageTextToText``;
  the paper used InternVL2, Appendix O), prompted with the paper's Appendix O instruction and the
  class noun as the tag; the answer is lower-cased, cut into comma-separated phrases, and the
  trigger is put in front of the class noun (``"1 dog, running"`` → ``"1 sks dog, running"``);
* ``--template``: a deterministic caption, ``"1 {trigger} {class}"`` plus optional phrases, no model.

Every caption holds the trigger, so the trainer can split it into ``c_p`` (the trigger's phrase)
and ``c_g`` (the rest). Existing captions are never replaced unless ``--overwrite`` is given.
The command's flags are in :mod:`accord.commands.caption`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from .data.captions import join_phrases, split_phrases, trigger_pattern
from .errors import ConfigError, ModelLoadError

__all__ = [
    "APPENDIX_O_PROMPT",
    "DEFAULT_TEMPLATE",
    "DEFAULT_VLM",
    "VLMCaptioner",
    "caption_folder",
    "clean_caption",
    "insert_trigger",
    "template_caption",
]

DEFAULT_VLM = "OpenGVLab/InternVL3-1B-hf"
DEFAULT_TEMPLATE = "1 {trigger} {class_noun}"
APPENDIX_O_PROMPT = (
    "You are an excellent prompt engineer. Given an image and a tag corresponding to an important object in the "
    "image, please describe the given image in short for the image generation process of the SD model. "
    "Note that the prompt you give should consist of a series of phrases, not a complete sentence, and must contain "
    "the tag corresponding to the important object. Please do not describe the important object in detail. Please do "
    "not answer anything other than the prompt. The prompt you give needs to use all lowercase letters. Here is an "
    "example: 1 dog, running, sea, sunset. Now, the important objects are: {tag}"
)


def _noun(class_noun: str) -> str:
    noun = " ".join((class_noun or "").split())
    if not noun:
        raise ConfigError("--class is empty; give the subject's class noun, e.g. --class dog")
    return noun


def template_caption(trigger: str, class_noun: str, phrases: Sequence[str] = (),
                     template: str = DEFAULT_TEMPLATE) -> str:
    """``"1 sks dog, on grass"`` from the template and optional extra phrases (deterministic)."""
    trigger_pattern(trigger)
    try:
        head = template.format(trigger=trigger.strip(), class_noun=_noun(class_noun))
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"--template {template!r}: bad placeholder ({exc}); "
                          "use {trigger} and {class_noun}") from None
    caption = join_phrases(split_phrases(", ".join([head, *phrases])))
    if not trigger_pattern(trigger).search(caption):
        raise ConfigError(f"--template {template!r} does not contain {{trigger}}; captions must hold the trigger")
    return caption


def insert_trigger(caption: str, trigger: str, class_noun: str) -> str:
    """Make sure the caption holds the trigger: before the first class noun, else as a leading phrase."""
    if trigger_pattern(trigger).search(caption):
        return caption
    noun = _noun(class_noun)
    pattern = re.compile(rf"(?<!\w){re.escape(noun)}(?!\w)", re.IGNORECASE)
    if pattern.search(caption):
        return pattern.sub(f"{trigger.strip()} {noun}", caption, count=1)
    return join_phrases([f"1 {trigger.strip()} {noun}", *split_phrases(caption)])


def clean_caption(text: str, trigger: str, class_noun: str) -> str:
    """A VLM answer as comma-separated lower-case phrases holding the trigger."""
    text = text.strip().strip("\"'`").lower()
    text = re.sub(r"^(prompt|caption)\s*:\s*", "", text)
    text = text.replace("\n", ", ").rstrip(".")
    phrases = list(dict.fromkeys(p.strip(" .;\"'") for p in split_phrases(text)))
    return insert_trigger(join_phrases(p for p in phrases if p), trigger, class_noun)


class VLMCaptioner:
    """``captioner(image, instruction) -> text`` over a transformers image-text-to-text model."""

    def __init__(self, model: str = DEFAULT_VLM, device: str = "cpu", dtype=None, max_new_tokens: int = 60, *,
                 built=None):
        """``built=(model, processor)`` injects an already built pair (tests, custom loading)."""
        if built is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            kwargs = {"dtype": dtype} if dtype is not None else {}
            try:
                processor = AutoProcessor.from_pretrained(model)
                net = AutoModelForImageTextToText.from_pretrained(model, **kwargs)
            except Exception as exc:
                first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                raise ModelLoadError(
                    f"cannot load captioning model {model!r} ({first}); "
                    "offline? pass a local transformers folder as --model DIR"
                ) from None
            built = (net, processor)
        self.model, self.processor = built[0].to(device).eval(), built[1]
        self.device, self.max_new_tokens = device, max_new_tokens

    def _inputs(self, image, instruction: str):
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user",
                         "content": [{"type": "image", "image": image}, {"type": "text", "text": instruction}]}]
            return self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
            ), True
        # captioners without a chat template (BLIP, GIT) cannot follow instructions: caption unconditionally
        return self.processor(images=image, return_tensors="pt"), False

    def __call__(self, image, instruction: str) -> str:
        import torch

        inputs, chat = self._inputs(image, instruction)
        inputs = inputs.to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if chat and "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(out, skip_special_tokens=True)[0]


def caption_folder(
    folder: str | Path,
    trigger: str,
    class_noun: str,
    captioner: Callable | None = None,
    template: str | None = None,
    phrases: Sequence[str] = (),
    prompt: str = APPENDIX_O_PROMPT,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, list[Path]]:
    """Write ``<stem>.txt`` beside each image; returns ``{"written": [...], "skipped": [...]}``."""
    from tqdm.auto import tqdm

    from .eval.images import list_images, load_image

    trigger_pattern(trigger)  # validate before any work
    noun = _noun(class_noun)
    if captioner is None and template is None:
        raise ConfigError("give a captioning model or --template")
    if "{tag}" not in prompt:
        raise ConfigError("--prompt must contain {tag} (where the class noun goes)")
    done: dict[str, list[Path]] = {"written": [], "skipped": []}
    for path in tqdm(list_images(folder), desc="captioning", disable=not progress):
        sidecar = path.with_suffix(".txt")
        if sidecar.exists() and not overwrite:
            done["skipped"].append(sidecar)
            continue
        if template is not None:
            caption = template_caption(trigger, noun, phrases, template)
        else:
            caption = clean_caption(captioner(load_image(path), prompt.format(tag=noun)), trigger, noun)
            if phrases:
                caption = join_phrases([*split_phrases(caption), *phrases])
        sidecar.write_text(caption + "\n", encoding="utf-8")
        done["written"].append(sidecar)
    return done
