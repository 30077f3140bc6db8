"""One training micro-batch, in four parts that read top to bottom:

1. :func:`noised_inputs` — latents, noise, timesteps, ``x_t``, the training target and the loss mask;
2. :class:`Conditions` — what the denoiser is conditioned on: joint ``(c_p, c_g)``, personal ``c_p``, general
   ``c_g``, empty ``∅``, and any other prompt a term needs (the superclass ``c_s``, SuDe's category prompt);
3. :class:`Term` — each regularizer as a plug-in: the predictions without gradient it needs and its per-sample
   values; :func:`assemble` reduces every term by one rule (the mean over the rows it is defined on) and weights it;
4. a schedule — :func:`fast`, :func:`lean` or :func:`frozen_personal` — runs the forwards and its own backward
   passes and returns the losses. :func:`run_step` picks one.

A new regularizer variant is a :class:`Term`; the schedules do not change.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .backbones import Conditioning
from .config import Config
from .data.captions import join_phrases
from .losses import classdiffusion_loss, dd_variant_loss, pd_loss, sude_loss
from .losses.dd_variants import ANCHORED

__all__ = ["StepLosses", "TextCache", "LatentCache", "Inputs", "Conditions", "Term", "noised_inputs", "build_terms",
           "pd_applies", "assemble", "fast", "lean", "frozen_personal", "run_step", "SCHEDULES"]

#: ``backward(loss, last)``: run the backward pass of one piece of the step's loss (``last``: the step's final
#: piece, when DDP synchronises gradients); returns False, having run nothing, when some rank's loss is not finite.
Backward = Callable[[torch.Tensor, bool], bool]


@dataclass
class StepLosses:
    total: torch.Tensor  # the micro-batch's loss (detached), as logged
    parts: dict  # name -> detached float tensor, for logging
    finite: bool = True  # False: a rank's loss was not finite, no backward ran (the step is skipped)


# ---------------------------------------------------------------------------- caches


class TextCache:
    """Encodings of frozen text encoders, computed once per prompt (text-embedding caching)."""

    def __init__(self, backbone, enabled: bool):
        self.backbone, self.enabled, self.store = backbone, enabled, {}

    def __call__(self, prompts: list[str], grad: bool) -> Conditioning:
        if grad or not self.enabled:
            with torch.set_grad_enabled(grad):
                return self.backbone.encode_prompts(prompts)
        missing = sorted({p for p in prompts if p not in self.store})
        if missing:
            with torch.no_grad():
                encoded = self.backbone.encode_prompts(missing)
            for i, p in enumerate(missing):
                self.store[p] = encoded[i : i + 1].detach()
        return Conditioning.cat([self.store[p] for p in prompts])


class LatentCache:
    """VAE posteriors (mean, std) of fixed-crop images, encoded once; a fresh sample is drawn each step."""

    def __init__(self, backbone, enabled: bool):
        self.backbone, self.enabled, self.store = backbone, enabled, {}

    def __call__(self, pixels: torch.Tensor, keys: list, generator) -> torch.Tensor:
        with torch.no_grad():
            if not self.enabled:
                return self.backbone.encode_images(pixels.to(self.backbone.device), generator=generator)
            missing = [i for i, k in enumerate(keys) if k not in self.store]
            if missing:
                mean, std = self.backbone.latent_distribution(pixels[missing].to(self.backbone.device))
                for j, i in enumerate(missing):
                    self.store[keys[i]] = (mean[j : j + 1], std[j : j + 1])
            mean = torch.cat([self.store[k][0] for k in keys])
            std = torch.cat([self.store[k][1] for k in keys])
            return self.backbone.latents_from(mean, std, generator=generator)


# ---------------------------------------------------------------------------- 1. inputs


@dataclass
class Inputs:
    """One noised micro-batch: rows ``[:n_instance]`` are references, the rest class images (prior preservation)."""

    batch: dict  # the instance batch, after ``method.prepare_batch``
    class_batch: dict | None
    n_instance: int
    captions: list[str]  # every row's caption
    timesteps: torch.Tensor
    noisy: torch.Tensor  # x_t
    target: torch.Tensor
    mask: torch.Tensor | None  # [B, 1, h, w] loss weights at latent size, or None
    size_cond: torch.Tensor | None  # SDXL's size/crop conditioning per row, or None


def noised_inputs(config: Config, backbone, method, batch: dict, class_batch: dict | None, generator,
                  latent_cache: LatentCache, timesteps: torch.Tensor | None = None) -> Inputs:
    """Draw the noise and timesteps of one micro-batch from ``generator`` (``timesteps`` fixes them instead)."""
    device, param = backbone.device, backbone.parameterization
    batch = method.prepare_batch(batch, generator)
    n_inst = len(batch["caption"])
    captions, pixels = list(batch["caption"]), batch["pixel_values"]
    keys = [("instance", int(i)) for i in batch["index"]]
    if class_batch is not None:
        pixels = torch.cat([pixels, class_batch["pixel_values"]])
        captions += list(class_batch["caption"])
        keys += [("class", int(i)) for i in class_batch["index"]]
    latents = latent_cache(pixels, keys, generator).float()
    noise = torch.randn(latents.shape, generator=generator).to(device)
    if config.train.noise_offset:
        noise = noise + config.train.noise_offset * torch.randn(
            latents.shape[:2] + (1, 1), generator=generator
        ).to(device)
    if timesteps is None:
        timesteps = backbone.sample_timesteps(latents.shape[0], generator, config.train)
    timesteps = timesteps.to(device)
    mask = method.loss_mask(batch)
    if mask is not None:  # pixel mask → latent size, all ones for class images
        mask = F.interpolate(mask.float(), size=latents.shape[-2:], mode="nearest")
        mask = torch.cat([mask, torch.ones(len(latents) - n_inst, *mask.shape[1:])]).to(device)
    return Inputs(batch, class_batch, n_inst, captions, timesteps, param.add_noise(latents, noise, timesteps),
                  param.training_target(latents, noise, timesteps), mask, _size_conditions(batch, class_batch))


def _size_conditions(batch: dict, class_batch: dict | None) -> torch.Tensor | None:
    """SDXL's size/crop conditioning per sample: original (h, w), crop top-left, target (h, w)."""
    if "original_size" not in batch:
        return None
    parts = [batch] + ([class_batch] if class_batch is not None else [])
    original = torch.cat([b["original_size"] for b in parts])
    crop = torch.cat([b["crop_top_left"] for b in parts])
    h, w = batch["pixel_values"].shape[-2:]
    target = torch.tensor([[h, w]]).repeat(original.shape[0], 1)
    return torch.cat([original, crop, target], dim=1)


def _with_size(cond: Conditioning, size_cond: torch.Tensor | None) -> Conditioning:
    if cond.time_ids is None or size_cond is None:
        return cond
    return dataclasses.replace(cond, time_ids=size_cond.to(cond.time_ids.device, cond.time_ids.dtype))


# ---------------------------------------------------------------------------- 2. conditions


def superclass_prompts(prompts: list[str], superclass: str, trigger: str) -> list[str]:
    """Each prompt with the class noun in place of the trigger (c_s for PDLoss, SuDe, ClassDiffusion)."""
    from .data.captions import trigger_pattern

    # "1 sks backpack" → "1 backpack" (the noun already follows the trigger); "sks on a table" → "backpack on a table".
    pattern = re.compile(rf"{trigger_pattern(trigger).pattern}(\s+{re.escape(superclass)}(?!\w))?", re.IGNORECASE)
    return [" ".join(pattern.sub(superclass, p).split()) for p in prompts]


def names_general(caption: str, general: str) -> bool:
    """Whether ``caption`` names ``general``: every word of it is among the caption's (so Break-A-Scene's
    "a photo of <asset1>" is named by "a photo of <asset0> and <asset1>", and "park" by "sks dog at the park")."""
    words = lambda text: set(text.replace(",", " ").lower().split())  # noqa: E731
    return words(general) <= words(caption)


class Conditions:
    """What the denoiser is conditioned on in one micro-batch.

    - ``joint``: every row's caption ``(c_p, c_g)``, with gradient where the method trains text, the reference
      image attached for image-encoder methods;
    - for the DD rows (instance rows whose caption names other concepts; ``rows``, at most ``accord.dd_batch``):
      :meth:`personal` ``c_p`` (with gradient and the image, built afresh on each call since a backward frees its
      graph), ``general`` ``c_g`` and ``empty`` ``∅`` (without gradient or image);
    - Eq. 7's joint of each DD row is its caption, except where the caption does not name the row's ``c_g``
      (:func:`names_general`; an explicit ``general`` in ``metadata.jsonl`` that the caption leaves out): those rows
      (``own``, indices into the DD rows) get :meth:`own_joint`, ``"c_p, c_g"`` with gradient, since the caption's
      prediction is then not a prediction given both concepts;
    - :meth:`frozen`: any other prompt without gradient (the superclass, SuDe's category prompt).
    """

    def __init__(self, config: Config, method, text: TextCache, inputs: Inputs, superclass: str, dd_on: bool):
        self.config, self.method, self.text, self.inputs, self.superclass = config, method, text, inputs, superclass
        batch = inputs.batch
        terms = method.dd_conditions(batch) if dd_on else []
        if config.accord.dd_batch is not None:
            terms = terms[: config.accord.dd_batch]
        self.personal_prompts = [p for _, p, _ in terms]
        self.general_prompts = [g for _, _, g in terms]
        self.rows = torch.tensor([r for r, _, _ in terms], dtype=torch.long, device=inputs.noisy.device)
        captions = [inputs.captions[r] for r, _, _ in terms]
        self.dd_joint_prompts = [c if names_general(c, g) else join_phrases([p, g])
                                 for c, (_, p, g) in zip(captions, terms)]
        self.own = torch.tensor([j for j, (c, d) in enumerate(zip(captions, self.dd_joint_prompts)) if c != d],
                                dtype=torch.long, device=inputs.noisy.device)
        self.image = method.reference_condition(batch)
        self.joint = method.attach(_with_size(text(inputs.captions, method.trains_text), inputs.size_cond), self.image)
        self._general = self._empty = None

    @property
    def k(self) -> int:
        return len(self.personal_prompts)

    def _rows_size(self, rows: torch.Tensor):
        return None if self.inputs.size_cond is None else self.inputs.size_cond[rows.cpu()]

    def personal(self, fresh: bool = False) -> Conditioning:
        """c_p of the DD rows (``fresh``: the reference image encoded again, after a backward freed its graph)."""
        image = self.method.reference_condition(self.inputs.batch) if fresh and self.image is not None else self.image
        return self.method.attach(_with_size(self.text(self.personal_prompts, self.method.trains_text),
                                             self._rows_size(self.rows)), None if image is None else image[self.rows])

    def own_joint(self) -> Conditioning:
        """``"c_p, c_g"`` of the DD rows in :attr:`own`, with gradient where the method trains text and the image."""
        rows = self.rows[self.own]
        prompts = [self.dd_joint_prompts[j] for j in self.own.tolist()]
        return self.method.attach(_with_size(self.text(prompts, self.method.trains_text), self._rows_size(rows)),
                                  None if self.image is None else self.image[rows])

    def frozen(self, prompts: list[str], rows: torch.Tensor) -> Conditioning:
        with torch.no_grad():
            return self.method.attach(_with_size(self.text(prompts, False), self._rows_size(rows)), None)

    @property
    def general(self) -> Conditioning:
        if self._general is None:
            self._general = self.frozen(self.general_prompts, self.rows)
        return self._general

    @property
    def empty(self) -> Conditioning:
        if self._empty is None:
            self._empty = self.frozen([""] * self.k, self.rows)
        return self._empty

    def superclass_of(self, prompts: list[str]) -> list[str]:
        return superclass_prompts(prompts, self.superclass, self.config.data.trigger)


# ---------------------------------------------------------------------------- 3. terms


@dataclass
class Predictions:
    """Denoiser outputs by name: ``joint`` (every row), ``personal`` (DD rows), ``own_joint`` (the DD rows in
    :attr:`Conditions.own`) and each term's frozen ones."""

    joint: torch.Tensor
    personal: torch.Tensor | None = None
    frozen: dict = field(default_factory=dict)
    own_joint: torch.Tensor | None = None


class Term:
    """A weighted regularizer of the step.

    ``frozen(step)``: the predictions without gradient it needs, as ``{name: (rows, Conditioning)}``, run as one
    forward; ``frozen_base(step)``: the same through the base model (:meth:`Method.base_model`), one more forward;
    ``per_sample(step, preds)``: its values, one per row it is defined on, and detached components to log.
    ``reads_personal``: it uses ``preds.personal`` (the lean schedule's second backward then runs it alone).
    """

    name = ""
    reads_personal = False
    uses_base = False  # has frozen_base predictions

    def __init__(self, weight: float):
        self.weight = weight

    def frozen(self, step: Step) -> dict[str, tuple[torch.Tensor, Conditioning]]:
        return {}

    def frozen_base(self, step: Step) -> dict[str, tuple[torch.Tensor, Conditioning]]:
        return {}

    def per_sample(self, step: Step, preds: Predictions) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


class DDTerm(Term):
    """DDLoss on the DD rows: Eq. 8 (:func:`accord.losses.dd_loss`) or the variant ``accord.dd_variant`` names
    (:mod:`accord.losses.dd_variants`); the anchored ones add the superclass's predictions through the base
    model (four; conditional's two), as one forward without gradient."""

    name, reads_personal = "dd", True

    def __init__(self, weight: float, variant: str = "paper"):
        super().__init__(weight)
        self.variant, self.uses_base = variant, variant in ANCHORED

    def frozen(self, step):
        return {"general": (step.conds.rows, step.conds.general), "null": (step.conds.rows, step.conds.empty)}

    def frozen_base(self, step):
        if self.variant not in ANCHORED:
            return {}
        conds, rows = step.conds, step.conds.rows
        joint_s = conds.superclass_of(conds.dd_joint_prompts)
        personal_s = [s or conds.superclass for s in conds.superclass_of(conds.personal_prompts)]
        wanted = {"anchor_joint": (rows, conds.frozen(joint_s, rows)),
                  "anchor_superclass": (rows, conds.frozen(personal_s, rows))}
        if self.variant != "conditional":  # conditional reads only U_js − U_s
            wanted.update(anchor_general=(rows, conds.frozen(conds.general_prompts, rows)),
                          anchor_null=(rows, conds.frozen([""] * conds.k, rows)))
        return wanted

    def per_sample(self, step, preds):
        rows, inputs, f = step.conds.rows, step.inputs, preds.frozen
        anchor = None
        if self.variant in ANCHORED:
            anchor = tuple(f.get(f"anchor_{n}") for n in ("joint", "superclass", "general", "null"))
        per, comps = dd_variant_loss(self.variant, step.dd_joint(preds), preds.personal, f["general"], f["null"],
                                     sample=inputs.noisy[rows], timesteps=inputs.timesteps[rows],
                                     scheduler=step.backbone.noise_scheduler, scale=step.config.accord.dd_scale,
                                     anchor=anchor)
        logs = {"dependence_shift": comps["dependence_shift"].mean()}
        if "anchor_shift" in comps:
            logs["anchor_shift"] = comps["anchor_shift"].mean()
        logs.update({f"eq7_{name}": v.mean() for name, v in comps["terms"].items()})  # nats per element
        return per, logs


class SuDeTerm(Term):
    """SuDe (:func:`accord.losses.sude_loss`): the category prompt (each caption with the class noun for the
    trigger) and the empty prompt on the instance rows, against the joint prediction."""

    name = "sude"

    def _instance_rows(self, step):
        return torch.arange(step.inputs.n_instance, device=step.inputs.noisy.device)

    def frozen(self, step):
        rows = self._instance_rows(step)
        captions = step.inputs.captions[: len(rows)]
        return {"category": (rows, step.conds.frozen(step.conds.superclass_of(captions), rows)),
                "category_null": (rows, step.conds.frozen([""] * len(rows), rows))}

    def per_sample(self, step, preds):
        reg, n = step.config.regularizers, step.inputs.n_instance
        truncation = "category" if reg.sude_truncation == "category" else reg.sude_tau
        per, comps = sude_loss(preds.joint[:n], preds.frozen["category"], preds.frozen["category_null"],
                               timesteps=step.inputs.timesteps[:n], scheduler=step.backbone.noise_scheduler,
                               truncation=truncation, scale=step.config.accord.dd_scale)
        return per, {}


class ClassDiffusionTerm(Term):
    """ClassDiffusion's SPL (:func:`accord.losses.classdiffusion_loss`): EOS features of each c_p phrase (with
    gradient) against its class-noun version."""

    name = "classdiffusion"

    def per_sample(self, step, preds):
        personal = list(step.inputs.batch["personal"])
        f_p = step.backbone.projected_text_features(personal)
        with torch.no_grad():
            f_c = step.backbone.projected_text_features(step.conds.superclass_of(personal))
        return classdiffusion_loss(f_p, f_c)[0], {}


class PDTerm(Term):
    """PDLoss, Eq. 11 (:func:`accord.losses.pd_loss`): f_p from each c_p phrase (learned token inside) unless the
    method gives it (the projected image tokens of image-encoder methods), f_s from the same phrase with the class
    noun for the trigger (the class noun alone where c_p has no text), f_g from each other concept apart."""

    name = "pd"

    def per_sample(self, step, preds):
        from .data.captions import split_phrases

        backbone, batch = step.backbone, step.inputs.batch
        personal, general = list(batch["personal"]), list(batch["general"])
        f_p = step.method.personal_features(step.conds.image)
        if f_p is None:
            f_p = backbone.projected_text_features(personal)
        supers = [s or step.conds.superclass for s in step.conds.superclass_of(personal)]
        phrases = [split_phrases(g) for g in general]
        width = max(1, max(len(p) for p in phrases))
        flat = [ph for p in phrases for ph in p]
        with torch.no_grad():
            f_s = backbone.projected_text_features(supers)
            f_flat = backbone.projected_text_features(flat) if flat else None
        f_g = torch.zeros(len(personal), width, f_p.shape[-1], device=f_p.device, dtype=f_p.dtype)
        mask = torch.zeros(len(personal), width, dtype=torch.bool, device=f_p.device)
        i = 0
        for b, p in enumerate(phrases):
            for j in range(len(p)):
                f_g[b, j], mask[b, j] = f_flat[i], True
                i += 1
        return pd_loss(f_p, f_s, f_g, mask=mask)[0], {}


def pd_applies(method) -> bool:
    """Whether PDLoss has something to train: c_p is a learned token or image feature, or the method trains the
    text encoder (``method.train_text_encoder``), through which the trigger phrase's features f_p move."""
    return bool(method.learns_personal_embedding or method.trains_text)


def build_terms(config: Config, method, force_dd: bool = False) -> list[Term]:
    """The step's regularizers with a weight above 0 (``force_dd``: DDLoss at its weight even at 0, for its
    logged terms — ``accord probe``), in the order they are summed."""
    losses, reg = config.accord, config.regularizers  # the ACCORD losses' section and the comparators'
    terms: list[Term] = []
    if losses.dd_weight > 0 or force_dd:
        terms.append(DDTerm(losses.dd_weight, losses.dd_variant))
    if reg.sude_weight > 0:
        terms.append(SuDeTerm(reg.sude_weight))
    if reg.classdiffusion_weight > 0 and method.trains_text:
        terms.append(ClassDiffusionTerm(reg.classdiffusion_weight))
    if losses.pd_weight > 0 and pd_applies(method):
        terms.append(PDTerm(losses.pd_weight))
    return terms


def assemble(step: Step, terms: list[Term], preds: Predictions) -> dict[str, torch.Tensor]:
    """Each term's weighted loss: its weight times the mean of its per-sample values (the one reduction rule);
    its unweighted mean and components go to ``step.parts``."""
    out = {}
    for term in terms:
        per, logs = term.per_sample(step, preds)
        value = _reduce(per)
        step.parts[term.name] = value.detach()
        step.parts.update(logs)
        out[term.name] = term.weight * value
    return out


def _reduce(per: torch.Tensor) -> torch.Tensor:
    """The one reduction rule: the mean over the rows a term is defined on (0 where it has none)."""
    return per.mean() if per.numel() else per.sum()


# ---------------------------------------------------------------------------- 4. schedules


@dataclass
class Step:
    """Everything a schedule reads: the models, the noised inputs, their conditions and the terms."""

    config: Config
    backbone: object
    method: object
    inputs: Inputs
    conds: Conditions
    terms: list[Term]
    params: list  # trained parameters for the gradient shares; empty: shares not measured
    parts: dict = field(default_factory=dict)

    @property
    def personal_terms(self) -> list[Term]:
        return [t for t in self.terms if t.reads_personal]

    def predict(self, noisy, timesteps, cond) -> torch.Tensor:
        return self.backbone.predict(noisy, timesteps, cond)

    def predict_joint(self, extra: Conditioning | None = None) -> Predictions:
        """One forward with gradient: every row's caption, then the DD rows' own joint (:meth:`Conditions.own_joint`),
        then ``extra`` on the DD rows (``fast``'s c_p, as ``personal``)."""
        inputs, conds = self.inputs, self.conds
        parts = [(inputs.noisy, inputs.timesteps, conds.joint)]
        if len(conds.own):
            own = conds.rows[conds.own]
            parts.append((inputs.noisy[own], inputs.timesteps[own], conds.own_joint()))
        if extra is not None:
            parts.append((inputs.noisy[conds.rows], inputs.timesteps[conds.rows], extra))
        if len(parts) == 1:  # no DD rows: the batch as it is, without a copy
            return Predictions(self.predict(*parts[0]))
        noisy, timesteps, cond = zip(*parts)
        pred = list(self.predict(torch.cat(noisy), torch.cat(timesteps), Conditioning.cat(list(cond)))
                    .split([len(x) for x in noisy]))
        return Predictions(pred.pop(0), own_joint=pred.pop(0) if len(conds.own) else None,
                           personal=pred.pop(0) if extra is not None else None)

    def dd_joint(self, preds: Predictions) -> torch.Tensor:
        """Eq. 7's joint prediction of the DD rows: the caption's, or the row's own joint where it has one."""
        joint = preds.joint[self.conds.rows]
        return joint if preds.own_joint is None else joint.index_copy(0, self.conds.own, preds.own_joint)

    def frozen_predictions(self, terms: list[Term], lead: tuple[torch.Tensor, Conditioning] | None = None) -> dict:
        """Each term's frozen predictions, one forward per term (``lead``: rows and conditions prepended to the
        first term's forward when their shapes allow, returned as ``"lead"``)."""
        out = {}
        for term in terms:
            if term.uses_base:  # prompts encoded and predicted with the base model
                with self.method.base_model():
                    out.update(self._forward_group(term.frozen_base(self)))
            wanted = term.frozen(self)
            if not wanted:
                continue
            if lead is not None:
                first = next(iter(wanted.values()))[1]
                if lead[1].embeds.shape[1:] == first.embeds.shape[1:]:
                    wanted = {"lead": lead, **wanted}
                else:  # image tokens lengthen c_p's sequence (visual_encoder): a forward of its own
                    out.update(self._forward_group({"lead": lead}))
                lead = None
            out.update(self._forward_group(wanted))
        return out

    def _forward_group(self, wanted: dict) -> dict:
        """One forward without gradient of every ``{name: (rows, Conditioning)}``, split back by name."""
        rows = [r for r, _ in wanted.values()]
        all_rows = torch.cat(rows)
        with torch.no_grad():
            pred = self.predict(self.inputs.noisy[all_rows], self.inputs.timesteps[all_rows],
                                Conditioning.cat([c for _, c in wanted.values()]))
        return dict(zip(wanted, pred.split([len(r) for r in rows])))

    def main_loss(self, pred_joint: torch.Tensor) -> torch.Tensor:
        """The diffusion loss on the instance rows, prior preservation on the class rows and the method's own
        losses (no regularizer)."""
        per = diffusion_loss(self.config, self.backbone, pred_joint, self.inputs.target, self.inputs.timesteps,
                             self.inputs.mask)
        n = self.inputs.n_instance
        loss = per[:n].mean()
        self.parts["diffusion"] = loss.detach()
        if self.inputs.class_batch is not None:
            prior = per[n:].mean()
            self.parts["prior"] = prior.detach()
            loss = loss + self.config.data.prior_loss_weight * prior
        for name, value in self.method.extra_losses(self.inputs.batch).items():
            self.parts[name] = value.detach()
            loss = loss + value
        return loss


def diffusion_loss(config: Config, backbone, pred, target, timesteps, mask=None) -> torch.Tensor:
    """Per-sample MSE, min-SNR weighted if asked (Hang et al. 2023, via the parameterization adapter). ``mask``
    ``[B, 1, h, w]`` at latent size weights the error; the mean stays over all elements (as Break-A-Scene's code)."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        err = err * mask.to(err.device, err.dtype)
    per = err.flatten(1).mean(1)
    gamma = config.train.snr_gamma
    if gamma:
        per = per * backbone.parameterization.min_snr_weight(timesteps, gamma).to(per.device, per.dtype)
    return per


def fast(step: Step, backward: Backward | None) -> StepLosses:
    """One forward with gradient for the joint rows and the DD rows' c_p together, one without per term; one
    backward. The most memory, the fewest passes."""
    with step.method.capture():
        preds = step.predict_joint(step.conds.personal() if step.personal_terms else None)
    preds.frozen = step.frozen_predictions(step.terms)
    main, regs, total = _losses(step, preds)
    step.parts.update(_shares(main, regs, step.params)[0])
    return _backward_once(total, step.parts, backward)


def _losses(step: Step, preds: Predictions) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The main loss, each term's weighted loss, and their sum."""
    main = step.main_loss(preds.joint)
    regs = assemble(step, step.terms, preds)
    return main, regs, main + sum(regs.values())


def frozen_personal(step: Step, backward: Backward | None, *, last: bool = True):
    """c_p's prediction without gradient (with the DD term's c_g and ∅ in one forward), the joint with gradient;
    one backward. ``accord.dd_variant=frozen_personal`` is this schedule whatever ``accord.mode`` says, and it is
    the first part of :func:`lean`."""
    personal_terms = step.personal_terms
    lead = None
    if personal_terms:
        lead = (step.conds.rows, step.conds.personal().detach())
    frozen = step.frozen_predictions(personal_terms, lead) if personal_terms else {}
    with step.method.capture():
        preds = step.predict_joint()
    preds.personal = frozen.pop("lead", None)
    frozen.update(step.frozen_predictions([t for t in step.terms if t not in personal_terms]))
    preds.frozen = frozen
    main, regs, total = _losses(step, preds)
    if last:
        step.parts.update(_shares(main, regs, step.params)[0])
        return _backward_once(total, step.parts, backward)
    return total, main, regs, preds


def lean(step: Step, backward: Backward | None) -> StepLosses:
    """One forward with gradient alive at a time: :func:`frozen_personal`'s pass and its backward, then c_p's
    forward with gradient and a backward of the terms that read it (the joint prediction detached). The summed
    gradients equal :func:`fast`'s, since each term's gradient splits into its joint and its personal paths."""
    if not step.personal_terms:
        return frozen_personal(step, backward)
    total, main, regs, preds = frozen_personal(step, backward, last=False)
    personal_names = {t.name for t in step.personal_terms}
    first = {n: _grads(v, step.params) for n, v in regs.items() if n in personal_names} if step.params else {}
    shares, main_norm = _shares(main, {n: v for n, v in regs.items() if n not in personal_names}, step.params)
    step.parts.update(shares)
    if backward is not None and not backward(total, False):
        return StepLosses(total.detach(), step.parts, finite=False)
    del main, regs
    rows = step.conds.rows
    second_preds = Predictions(preds.joint.detach(), step.predict(step.inputs.noisy[rows], step.inputs.timesteps[rows],
                                                                  step.conds.personal(fresh=True)), preds.frozen,
                               None if preds.own_joint is None else preds.own_joint.detach())
    seconds = {}
    for term in step.personal_terms:
        per, _ = term.per_sample(step, second_preds)
        seconds[term.name] = term.weight * _reduce(per)
    second = sum(seconds.values())
    for name, value in seconds.items():
        if name in first:
            step.parts[f"share_{name}"] = _norm(first[name], _grads(value, step.params)) / main_norm
    if backward is not None and not backward(second, True):
        return StepLosses(total.detach(), step.parts, finite=False)
    return StepLosses(total.detach(), step.parts)


def _backward_once(total, parts, backward) -> StepLosses:
    """The step's one backward (none without ``backward``); ``finite=False`` where a rank's loss was not."""
    finite = backward is None or backward(total, True)
    return StepLosses(total.detach(), parts, finite=finite)


SCHEDULES = {"fast": fast, "lean": lean}


def run_step(config: Config, backbone, method, text: TextCache, batch: dict, class_batch: dict | None, generator,
             superclass: str, backward: Backward | None, latent_cache: LatentCache | None = None, *,
             measure_share: bool = False, timesteps: torch.Tensor | None = None,
             force_terms: bool = False) -> StepLosses:
    """The losses of one micro-batch, with the backward passes its schedule runs through ``backward`` (``None``:
    none, e.g. ``accord probe``).

    ``measure_share``: also log each regularizer's gradient norm relative to the diffusion loss's on the trained
    parameters (``share_dd``, ``share_pd``, ``share_sude``, ``share_classdiffusion``), through extra backward passes
    that leave ``.grad`` untouched. ``timesteps`` fixes the step's timesteps instead of drawing them;
    ``force_terms`` computes Eq. 7's terms even with DDLoss off.
    """
    inputs = noised_inputs(config, backbone, method, batch, class_batch, generator,
                           latent_cache or LatentCache(backbone, enabled=False), timesteps)
    terms = build_terms(config, method, force_dd=force_terms)
    conds = Conditions(config, method, text, inputs, superclass, dd_on=any(t.reads_personal for t in terms))
    if not conds.k:  # no caption of this micro-batch names another concept: nothing for DDLoss to decouple
        terms = [t for t in terms if not t.reads_personal]
    step = Step(config, backbone, method, inputs, conds, terms, method.parameters() if measure_share else [])
    if "caption_dropped" in inputs.batch:  # data.caption_dropout's empty captions carry no DD term; log how many
        step.parts["captions_dropped"] = inputs.batch["caption_dropped"].float().sum()
    if config.accord.dd_variant == "frozen_personal":  # no gradient through U(c_p): nothing for a second pass
        return frozen_personal(step, backward)
    return SCHEDULES[config.accord.mode](step, backward)


# ---------------------------------------------------------------------------- gradient shares


def _grads(loss, params: list) -> list:
    """``∂loss/∂params`` without touching ``.grad`` (``None`` where a parameter is not reached)."""
    if not torch.is_tensor(loss) or not loss.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def _norm(*grad_lists) -> torch.Tensor:
    """The norm of the sum of gradient lists (float32)."""
    total = torch.zeros((), dtype=torch.float32)
    for together in zip(*grad_lists):
        present = [g.float() for g in together if g is not None]
        if present:
            total = total + sum(present[1:], present[0]).pow(2).sum().cpu()
    return total.sqrt()


def _shares(main, regs: dict, params: list) -> tuple[dict, torch.Tensor | None]:
    """``share_<name>``: ‖∇(w·L_name)‖ / ‖∇L_diffusion‖ on ``params``, and ‖∇L_diffusion‖ (``{}, None`` when no
    parameters are given: nothing measured)."""
    if not params:
        return {}, None
    main_norm = _norm(_grads(main, params)).clamp_min(1e-30)
    return {f"share_{name}": _norm(_grads(value, params)) / main_norm for name, value in regs.items()}, main_norm
