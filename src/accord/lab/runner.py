"""One lab experiment: fine-tune the lab model on a coupling task (``Setting.task``) with one method and one regularizer
setting, generate the fixed evaluation prompts, judge every image, and measure the dependence shift
over training (the paper's Fig. 6 analog).

Everything goes through the real code paths: :func:`accord.train.train` on the lab's
``StableDiffusionPipeline`` folder, :func:`accord.inference.load_trained` for sampling.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import AccordError
from . import task
from .judge import Judge, model_dir

__all__ = ["DEFAULT_METHODS", "METHODS", "REGULARIZERS", "Setting", "applies", "dependence_terms", "evaluate",
           "regularizer_config", "run_setting", "settings_for"]

# Per-method recipe (the paper's Sec. 4 hyper-parameters scaled to the lab: lr, trigger, trained parts), keyed by
# the registered method's name (accord.methods; `NAME+text` below: that recipe with the text encoder trained); the
# methods conditioned on an image encoder (visual_encoder, ip_adapter) have none: the lab has no image encoder.
# LoRA is rank 32: at rank 8 (the lab's first recipe, behind the notebook's figures before 2026-12-05) LoRA did not
# reach 60% fidelity within protocol 2's 600 steps on any task tried (50-54% on three tasks, 2e-3 and 3e-3 learning
# rates no better); rank 32 reached 58% and 85% on two seeds of object-object-generic, but 44% on style-content and
# 38% on subject-background (validation seed 100), where the subject's checkered pattern is a texture that attention
# alone learned slowly. So the UNet's convolutions get rank-16 LoRA too (LoCon, method.lora_conv_rank): 72% on
# style-content and 85% on object-object-generic at the same seed, for 1.6x the run time.
METHODS: dict[str, dict] = {
    "lora": {"method": {"name": "lora", "lora_rank": 32, "lora_conv_rank": 16}, "train": {"learning_rate": 1e-3},
             "trigger": "sks"},
    "dreambooth": {"method": {"name": "dreambooth"}, "train": {"learning_rate": 2e-4}, "trigger": "sks"},
    "textual_inversion": {"method": {"name": "textual_inversion", "placeholder_token": "<sks>"},
                          "train": {"learning_rate": 5e-3}, "trigger": "<sks>"},
    "custom_diffusion": {"method": {"name": "custom_diffusion", "modifier_token": "<new1>"},
                         "train": {"learning_rate": 1e-3}, "trigger": "<new1>"},
    # One masked subject (the circle); the triangle and background are context. Phase 1 (tokens only) takes
    # the first half of the steps, at TI's rate; phase 2 adds a rank-8 UNet LoRA at LoRA's rate.
    "break_a_scene": {"method": {"name": "break_a_scene", "bas_phase1_lr": 5e-3, "lora_rank": 8},
                      "train": {"learning_rate": 1e-3}, "trigger": "<asset0>"},
}
# LoRA and DreamBooth that also train the text encoder (method.train_text_encoder), at their recipes' rates: the
# trigger phrase's features f_p are learned then, so PDLoss and ClassDiffusion apply. Benched on request only.
METHODS.update({f"{m}+text": {**METHODS[m], "method": {**METHODS[m]["method"], "train_text_encoder": True}}
                for m in ("lora", "dreambooth")})
DEFAULT_METHODS = tuple(m for m in METHODS if not m.endswith("+text"))  # `lab bench`'s methods when none are named
# The paper's loss weights (Sec. 4: DDLoss 0.1-0.3, PDLoss 0.001-0.003), fixed before any lab result.
DD_WEIGHT, PD_WEIGHT = 0.2, 0.002
SUDE_WEIGHT, CLASSDIFFUSION_WEIGHT = 0.4, 0.1  # SuDe: its official code's default
REGULARIZERS: dict[str, dict] = {
    "none": {},
    "dd": {"accord": {"dd_weight": DD_WEIGHT, "dd_variant": "paper"}},  # Eq. 8 as written, whatever the default
    "pd": {"accord": {"pd_weight": PD_WEIGHT}},
    "dd+pd": {"accord": {"dd_weight": DD_WEIGHT, "pd_weight": PD_WEIGHT, "dd_variant": "paper"}},
    # DDLoss's conditional form (accord.dd_variant: conditional) at the same weight, chosen on validation seeds
    "dd-conditional": {"accord": {"dd_weight": DD_WEIGHT, "dd_variant": "conditional"}},
    "prior": {"data": {"with_prior_preservation": True, "num_class_images": 20}},
    # Comparators (docs/regularizers.md's example weights, fixed before any lab result).
    "sude": {"regularizers": {"sude_weight": SUDE_WEIGHT}},
    "classdiffusion": {"regularizers": {"classdiffusion_weight": CLASSDIFFUSION_WEIGHT}},
}
_PRIOR_METHODS = ("dreambooth", "custom_diffusion")  # the paper's baselines that use class images


_WEIGHT_KEYS = {"dd": ("accord", "dd_weight"), "pd": ("accord", "pd_weight"),
                "sude": ("regularizers", "sude_weight"), "classdiffusion": ("regularizers", "classdiffusion_weight")}
# DDLoss's forms by bench name (accord.dd_variant): ``dd`` is Eq. 8 as written whatever the default form, ``dd-sg``
# is DDLoss with U(c_p) stop-gradient too (dd_variant=frozen_personal); each takes ``@WEIGHT``.
_DD_FORMS = {"dd": "paper", "dd-sg": "frozen_personal", "dd-anchored": "anchored", "dd-alignment": "alignment",
             "dd-composition": "composition", "dd-conditional": "conditional"}


def _weighted(base: str) -> str:
    """The weight a bench name sets: DDLoss's for each of its forms, else the name's own."""
    return "dd" if base in _DD_FORMS else base


def regularizer_config(name: str) -> dict:
    """The config overrides of a regularizer setting: a name of :data:`REGULARIZERS`, or ``NAME@WEIGHT``
    (e.g. ``dd@20``) for an investigation at another weight — the protocol's rows keep the fixed weights;
    ``dd-sg@WEIGHT`` also stops DDLoss's gradient through U(c_p) (which passes carry gradient)."""
    if name in REGULARIZERS:
        return REGULARIZERS[name]
    base, _, weight = name.partition("@")
    regularizer = _weighted(base)
    extra = {"accord": {"dd_variant": _DD_FORMS[base]}} if base in _DD_FORMS else {}
    try:
        value = float(weight)
    except ValueError:
        value = -1.0
    if regularizer not in _WEIGHT_KEYS or not value > 0:
        raise AccordError(f"regularizer {name!r}: choose from {', '.join(REGULARIZERS)}, or NAME@WEIGHT with NAME in "
                          f"{', '.join([*_WEIGHT_KEYS, *(n for n in _DD_FORMS if n != 'dd')])} and a positive WEIGHT "
                          "(e.g. dd@20)")
    section, key = _WEIGHT_KEYS[regularizer]
    return _merge(extra, {section: {key: value}})


def dose(name: str) -> tuple[str, float] | None:
    """A weighted regularizer setting's family and weight, read from its config: ``dd@0.03`` → ("dd", 0.03), ``dd``
    → ("dd", 0.2), ``dd-conditional`` → ("dd-conditional", 0.2), ``pd`` → ("pd", 0.002); None for a setting with no
    single weight (``none``, ``prior``, ``dd+pd``) or an unknown name."""
    base = name.partition("@")[0]
    if _weighted(base) not in _WEIGHT_KEYS:
        return None
    try:
        config = regularizer_config(name)
    except AccordError:
        return None
    section, key = _WEIGHT_KEYS[_weighted(base)]
    value = config.get(section, {}).get(key)
    return (base, float(value)) if value is not None else None


def settings_for(method: str) -> list[str]:
    """The regularizer settings that apply to ``method``."""
    from ..methods.base import get_method

    regs = ["none", "dd", "dd-conditional"]
    if method == "break_a_scene":  # its own masked loss; SuDe's class prompts do not fit its union prompts
        return regs
    recipe = METHODS[method]["method"]
    # c_p is trainable (a learned embedding, or the text encoder the trigger phrase goes through): PDLoss applies
    trains_personal = get_method(recipe["name"]).learns_personal_embedding or bool(recipe.get("train_text_encoder"))
    if trains_personal:
        regs += ["pd", "dd+pd"]
    if recipe["name"] in _PRIOR_METHODS:
        regs.append("prior")
    regs.append("sude")  # SuDe needs only the class word, so every method can take it
    if trains_personal:
        regs.append("classdiffusion")  # ClassDiffusion needs a trained text side, like PDLoss
    return regs


def applies(regularizer: str, method: str) -> bool:
    """Whether a bench regularizer setting (a protocol name or an investigation ``NAME@WEIGHT``) fits ``method``."""
    base = regularizer.partition("@")[0]
    return _weighted(base) in settings_for(method)


@dataclass
class Setting:
    method: str = "lora"
    regularizer: str = "none"
    seed: int = 0
    steps: int = 150
    batch_size: int = 4
    images_per_prompt: int = 4
    sample_steps: int = 25
    guidance: float = 5.0
    checkpoints: int = 3  # dependence-shift measurements over training (plus the base model)
    prompts: tuple | None = None  # default: the task's
    task: task.Task = field(default_factory=task.default_task)

    def __post_init__(self):
        if self.prompts is None:
            self.prompts = self.task.prompts

    @property
    def name(self) -> str:
        return f"{self.method}-{self.regularizer}-s{self.seed}"

    def record(self) -> dict:
        """The setting as result and evaluation files keep it (what a resumed bench compares): every field, the
        prompts as their number and the task as its name and protocol version."""
        kept = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("prompts", "task")}
        return {**kept, "prompts": len(self.prompts), "task": self.task.name,
                "task_version": self.task.protocol_version}


def _merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in a.items()}
    for k, v in b.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def build_config(s: Setting, refs: Path, out: Path, weights: Path | None = None):
    from ..config import config_from_dict

    recipe = METHODS[s.method]
    model = model_dir(weights)
    every = max(1, s.steps // s.checkpoints) if s.checkpoints else 0
    method = dict(recipe["method"])
    if s.method == "break_a_scene":
        method["bas_phase1_steps"] = s.steps // 2
    data = {
        "model": {"pretrained": str(model)},
        "data": {"instance_dir": str(refs), "class_noun": s.task.class_noun, "trigger": recipe["trigger"],
                 "resolution": 32, "class_dir": str(out.parent / "class-images"), "class_prompt": s.task.class_noun},
        "method": method,
        "accord": {"pd_clip": str(model / "text_encoder")},
        "train": {**recipe["train"], "output_dir": str(out), "max_steps": s.steps, "batch_size": s.batch_size,
                  "seed": s.seed, "checkpoint_every": every, "checkpoints_total_limit": None, "log_every": 10 ** 6,
                  "report_to": "none", "cache_latents": True, "overwrite_output_dir": True},
    }
    return config_from_dict(_merge(data, regularizer_config(s.regularizer))).validate()


def references(folder: Path, trigger: str, method: str = "lora", t: task.Task | None = None) -> Path:
    """The task's references (default: the default task's) with ``trigger`` in the captions (masked, for
    Break-A-Scene)."""
    t = t or task.default_task()
    if method == "break_a_scene":
        return t.write_masked_references(folder, trigger)
    return t.write_references(folder, trigger)


def prompt_text(p: task.EvalPrompt, trigger: str, t: task.Task | None = None) -> str:
    return (t or task.default_task()).prompt_text(p, trigger)


@torch.no_grad()
def sample(pipe, prompts: list[str], s: Setting) -> list[np.ndarray]:
    """``images_per_prompt`` 32 px images per prompt (DDIM), seeded per (seed, prompt, image)."""
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator().manual_seed(10_007 * s.seed + 101 * i + k) for k in range(s.images_per_prompt)]
        images = pipe(prompt, num_images_per_prompt=s.images_per_prompt, generator=gens, height=32, width=32,
                      num_inference_steps=s.sample_steps, guidance_scale=s.guidance, output_type="np").images
        out += [(im * 255).round().clip(0, 255).astype(np.uint8) for im in images]
    return out


def _reference_images(refs: Path) -> list[Path]:
    """The reference images (those with a caption sidecar; Break-A-Scene's masks have none)."""
    return sorted(p for p in refs.glob("*.png") if p.with_suffix(".txt").is_file())


@torch.no_grad()
def dependence_shift(pipe, refs: Path, trigger: str, seed: int = 1234, draws: int = 8) -> float:
    """Mean |Δ| of Eq. 7 (nats per element) over the references' captions at fixed noise and timesteps:
    how much the joint caption's denoising step depends on c_p and c_g together (Fig. 6's left panel)."""
    return dependence_terms(pipe, refs, trigger, seed, draws)["shift"]


@torch.no_grad()
def dependence_terms(pipe, refs: Path, trigger: str, seed: int = 1234, draws: int = 8) -> dict[str, float]:
    """:func:`dependence_shift` (``shift``) with Eq. 7's three terms apart, each ``‖U_j − U_c‖² / (2σ_t²)`` in nats
    per element, averaged over the same draws: ``personal`` (c = c_p), ``general`` (c_g) and ``null`` (∅), so that
    Δ = personal + general − null per draw. Which term a regularizer moves says how it changed the dependence."""
    from diffusers import DDPMScheduler
    from PIL import Image

    from ..losses.dd import dependence_terms
    from .pretrain import to_tensor

    caps = [p.read_text().strip() for p in sorted(refs.glob("*.txt"))]
    imgs = to_tensor([np.asarray(Image.open(p).convert("RGB")) for p in _reference_images(refs)])
    personal = [c.split(",")[0].strip() for c in caps]
    general = [", ".join(x.strip() for x in c.split(",")[1:]) for c in caps]
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    latents = pipe.vae.encode(imgs).latent_dist.mean * pipe.vae.config.scaling_factor

    def enc(prompts):
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    conds = [enc(caps), enc(personal), enc(general), enc([""] * len(caps))]
    parts: dict[str, list] = {"shift": [], "personal": [], "general": [], "null": []}
    for _ in range(draws):
        t = torch.randint(1, sched.config.num_train_timesteps, (len(caps),), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        x_t = sched.add_noise(latents, noise, t)
        j, p, gen, null = (pipe.unet(x_t, t, encoder_hidden_states=c).sample for c in conds)
        terms = dependence_terms(j, p, gen, null, sample=x_t, timesteps=t, scheduler=sched)
        for name in ("personal", "general", "null"):
            parts[name].append(terms[name])
        parts["shift"].append(terms["shift"].abs())  # Eq. 7 is their signed sum
    return {k: torch.cat(v).mean().item() for k, v in parts.items()}


def evaluate(pipe, s: Setting, refs: Path, trigger: str, judge: Judge) -> tuple[list[dict], list[np.ndarray]]:
    """Sample ``s.prompts`` with ``pipe`` and judge every image: one row per image (the task's scores, mini-CLIP-T
    against the class prompt, mini-CLIP-I against the references) and the images."""
    from PIL import Image

    prompts = [s.task.prompt_text(p, trigger) for p in s.prompts]
    images = sample(pipe, prompts, s)
    detected = judge.detect(images)
    ref_feats = judge.image_features([np.asarray(Image.open(p).convert("RGB"))
                                      for p in _reference_images(refs)])
    img_feats = judge.image_features(images)
    class_prompts = [s.task.class_prompt(p) for p in s.prompts]
    txt_feats = judge.text_features(class_prompts)
    rows = []
    n = s.images_per_prompt
    for i, p in enumerate(s.prompts):
        for k in range(n):
            j = i * n + k
            r = s.task.score(prompts[i], detected[j], trigger)
            r.update(prompt=p.text, category=p.category, asks_coupled=p.asks_coupled,
                     clip_t=100 * float(img_feats[j] @ txt_feats[i]),
                     clip_i=100 * float((img_feats[j] @ ref_feats.T).mean()))
            rows.append(r)
    return rows, images


def run_setting(s: Setting, root: Path, judge: Judge, weights: Path | None = None, progress: bool = False) -> dict:
    """Train, sample and judge one setting; writes ``<root>/<name>/result.json`` and returns it."""
    from ..inference import load_trained
    from ..train import train

    recipe = METHODS[s.method]
    trigger = recipe["trigger"]
    refs = references(root / "references" / s.method, trigger, s.method, s.task)
    out = root / "runs" / s.name
    config = build_config(s, refs, out, weights)
    base_terms = _base_terms(root, refs, trigger, weights) if s.checkpoints else None
    train(config, progress=progress)
    terms = {0: base_terms} if base_terms is not None else {}
    for ckpt in sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        if int(ckpt.name.split("-")[1]) < s.steps:
            terms[int(ckpt.name.split("-")[1])] = dependence_terms(load_trained(ckpt), refs, trigger)
    pipe = load_trained(out)
    if s.checkpoints:
        terms[s.steps] = dependence_terms(pipe, refs, trigger)
    shifts = {k: v["shift"] for k, v in terms.items()}
    rows, images = evaluate(pipe, s, refs, trigger, judge)
    np.save(out / "samples.npy", np.stack(images))
    result = {"setting": s.record(), "name": s.name, "rows": rows,
              "dependence_shift": {str(k): v for k, v in sorted(shifts.items())},
              "dependence_terms": {str(k): v for k, v in sorted(terms.items())}}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return result


def _base_terms(root: Path, refs: Path, trigger: str, weights: Path | None) -> dict | None:
    """:func:`dependence_terms` of the base model: only defined when the trigger is a word it can read (not a new
    token)."""
    if trigger.startswith("<"):
        return None
    cache = root / "runs" / f"base-terms-{trigger}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from ..inference import load_trained

    value = dependence_terms(load_trained(model_dir(weights)), refs, trigger)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(value))
    return value
