"""Quality of the lab's miniature models, measured on fresh, held-out draws (seeds the recipe never used).

* detector: per-attribute accuracy on fresh renders (all patterns);
* mini-CLIP: top-1 retrieval (image→caption and caption→image) among 100 fresh pairs;
* T2I: compositional accuracy on held-out captions, as the detector judges: ``compositional`` is the
  share of images that contain every asked object with its asked colour and pattern, and the asked background;
  ``all_asked`` also requires every asked place (left/right), the stricter figure the bench's text accuracy uses.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from .judge import Judge, model_dir, score
from .world import PATTERNS, PRETRAIN_PATTERNS, SHAPES, caption, parse_caption, random_scene, render

__all__ = ["detector_accuracy", "clip_retrieval", "t2i_accuracy", "t2i_scores", "measure"]

HELD_OUT_SEED = 987_654


def detector_accuracy(judge: Judge, n: int = 1000, seed: int = HELD_OUT_SEED) -> dict[str, float]:
    rng = random.Random(seed)
    scenes = [random_scene(rng, patterns=PATTERNS) for _ in range(n)]
    found = judge.detect([render(s) for s in scenes])
    hits: dict[str, list] = {"background": [], "present": [], "color": [], "pattern": [], "place": []}
    for s, d in zip(scenes, found):
        hits["background"].append(d["background"] == s.background)
        for shape in SHAPES:
            o, got = s.find(shape), d["objects"].get(shape)
            hits["present"].append((o is not None) == (got is not None))
            if o is not None and got is not None:
                for k in ("color", "pattern", "place"):
                    hits[k].append(got[k] == getattr(o, k))
    return {k: float(np.mean(v)) for k, v in hits.items()}


def clip_retrieval(judge: Judge, n: int = 100, seed: int = HELD_OUT_SEED + 1) -> dict[str, float]:
    rng = random.Random(seed)
    scenes = [random_scene(rng, patterns=PRETRAIN_PATTERNS) for _ in range(n)]
    sims = judge.image_features([render(s) for s in scenes]) @ judge.text_features([caption(s) for s in scenes]).T
    target = torch.arange(n)
    return {"image_to_text_top1": float((sims.argmax(1) == target).float().mean()),
            "text_to_image_top1": float((sims.argmax(0) == target).float().mean()), "candidates": n}


@torch.no_grad()
def t2i_accuracy(judge: Judge, weights=None, n: int = 100, seed: int = HELD_OUT_SEED + 2, steps: int = 25,
                 guidance: float = 5.0) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir(weights), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(seed)
    scenes = [random_scene(rng, patterns=PRETRAIN_PATTERNS) for _ in range(n)]
    prompts = [caption(s, places=rng.random() < 0.5) for s in scenes]
    images = []
    for i in range(0, n, 25):
        gens = [torch.Generator().manual_seed(seed + k) for k in range(i, min(n, i + 25))]
        out = pipe(prompts[i:i + 25], generator=gens, height=32, width=32, num_inference_steps=steps,
                   guidance_scale=guidance, output_type="np").images
        images += [(im * 255).round().clip(0, 255).astype(np.uint8) for im in out]
    return {**t2i_scores(prompts, judge.detect(images)), "captions": n, "images": images, "prompts": prompts}


def t2i_scores(prompts: list[str], found: list[dict]) -> dict[str, float]:
    """Shares of images (detections ``found``) that have what their prompt asks: ``compositional`` = every asked object
    with its asked colour and pattern, and the asked background; ``all_asked`` = that and every asked place."""
    ok = [score(p, d, names={}, coupled="-", subject="-", subject_pattern="-")["text"] for p, d in zip(prompts, found)]
    per = {"background": [], "shapes": [], "colors": [], "patterns": [], "places": []}
    for p, d in zip(prompts, found):
        asked = parse_caption(p)
        per["background"].append(asked["background"] is None or d["background"] == asked["background"])
        per["shapes"].append(set(asked["objects"]) <= set(d["objects"]))
        for key, attr in (("colors", "color"), ("patterns", "pattern"), ("places", "place")):
            per[key].append(all(d["objects"].get(s, {}).get(attr) == w[attr] for s, w in asked["objects"].items()
                                if attr in w))
    whole = [b and s and c and p
             for b, s, c, p in zip(per["background"], per["shapes"], per["colors"], per["patterns"])]
    return {"compositional": float(np.mean(whole)), "all_asked": float(np.mean(ok)),
            **{k: float(np.mean(v)) for k, v in per.items()}}


def measure(weights=None, n_t2i: int = 100, n_renders: int = 1000, t2i_steps: int = 25) -> dict:
    judge = Judge(weights)
    t2i = t2i_accuracy(judge, weights, n=n_t2i, steps=t2i_steps)
    return {"detector": detector_accuracy(judge, n=n_renders), "clip": clip_retrieval(judge, n=min(100, n_renders)),
            "t2i": {k: v for k, v in t2i.items() if k not in ("images", "prompts")}, "_t2i": t2i}
