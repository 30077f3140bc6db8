"""Judging generated lab images: the detector (exact-label oracle) and the mini-CLIP analog metrics.

Per image, for an evaluation prompt:

* ``leak``      — the task's leak rule (:class:`accord.lab.task.Leak`; docs/lab.md), by default: the coupled
                  object's shape is present although the prompt does not ask for it;
* ``text``      — every asked attribute is present (background, each asked shape with its asked colour,
                  pattern and place);
* ``fidelity``  — the subject's shape is present with its distinctive pattern;
* ``clip_t``    — 100·cos(mini-CLIP image, mini-CLIP text of the prompt with the class noun for the trigger);
* ``clip_i``    — 100·mean cos(mini-CLIP image, mini-CLIP image of each reference).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AccordError
from . import models as M
from .world import BACKGROUNDS, COLORS, PATTERNS, PLACES, SHAPES, parse_caption

__all__ = ["WEIGHTS", "weights_dir", "model_dir", "Judge", "score"]

WEIGHTS = Path(__file__).parent / "weights"


def weights_dir(path: str | Path | None = None) -> Path:
    """The lab weights folder (the shipped one by default); a one-line error with the fix when missing."""
    d = Path(path) if path else WEIGHTS
    if not (d / "sd" / "model_index.json").is_file() or not (d / "detector.safetensors").is_file():
        raise AccordError(f"no lab weights in {d}: run `accord lab pretrain --out {d}` (about 2.3 h on 2 CPU cores)")
    return d


def model_dir(path: str | Path | None = None) -> Path:
    """The lab's StableDiffusionPipeline folder (``model.pretrained`` for ``accord train``)."""
    return weights_dir(path) / "sd"


def _load(module: torch.nn.Module, file: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(file).items()}
    state.pop("logit_scale", None)
    module.load_state_dict(state)
    return module.eval().requires_grad_(False)


def _as_input(images) -> torch.Tensor:
    from .pretrain import to_tensor

    if isinstance(images, torch.Tensor):
        return images.float()
    return to_tensor([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images])


class Judge:
    """The detector and mini-CLIP towers of one lab weights folder."""

    def __init__(self, path: str | Path | None = None):
        from transformers import CLIPTextModelWithProjection
        from transformers.utils import logging

        d = weights_dir(path)
        self.detector = _load(M.Detector(), d / "detector.safetensors")
        self.image_tower = _load(M.ImageTower(), d / "mini_clip_image.safetensors")
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            self.text_tower = CLIPTextModelWithProjection.from_pretrained(d / "sd" / "text_encoder").eval()
        finally:
            logging.set_verbosity(verbosity)
        self.tokenizer = M.tokenizer()

    @torch.no_grad()
    def detect(self, images) -> list[dict]:
        """Labels per image: ``{"background": str, "objects": {shape: {"color", "pattern", "place"}}}``."""
        logits = self.detector(_as_input(images))
        picks = {k: v.argmax(-1).tolist() for k, v in logits.items()}
        out = []
        for i in range(len(picks["background"])):
            objects = {}
            for s in SHAPES:
                if picks[f"{s}.present"][i]:
                    objects[s] = {"color": list(COLORS)[picks[f"{s}.color"][i]],
                                  "pattern": PATTERNS[picks[f"{s}.pattern"][i]],
                                  "place": PLACES[picks[f"{s}.place"][i]]}
            out.append({"background": list(BACKGROUNDS)[picks["background"][i]], "objects": objects})
        return out

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        return F.normalize(self.image_tower(_as_input(images)), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=M.TEXT_LEN, truncation=True,
                             return_tensors="pt").input_ids
        return F.normalize(self.text_tower(ids).text_embeds, dim=-1)


def score(prompt: str, detected: dict, *, names: dict[str, str], coupled: str, subject: str,
          subject_pattern: str, leak=None) -> dict[str, float]:
    """Leak, text accuracy and fidelity of one image (see the module docstring); 1.0 = yes. ``leak`` (a task's
    :class:`accord.lab.task.Leak`) replaces the default rule (``coupled`` is a shape present although unasked)."""
    asked = parse_caption(prompt, names)
    objs = detected["objects"]
    ok = asked["background"] is None or detected["background"] == asked["background"]
    for shape, want in asked["objects"].items():
        got = objs.get(shape)
        ok = ok and got is not None and all(got[k] == v for k, v in want.items())
    if leak is not None:
        leaked = leak.measure(asked, detected, subject)
    else:
        leaked = float(coupled not in asked["objects"] and coupled in objs)
    fid = float(subject in objs and objs[subject]["pattern"] == subject_pattern)
    return {"leak": leaked, "text": float(ok), "fidelity": fid}


@lru_cache(maxsize=2)
def _cached_judge(path: str | None) -> Judge:
    return Judge(path)
