"""Break-A-Scene (Avrahami et al., SIGGRAPH Asia 2023): several subjects of one scene, one learned token each.

The reference folder's ``metadata.jsonl`` gives each image one mask per subject token
(``"masks": {"<asset0>": "m0.png", "<asset1>": "m1.png"}``, see :mod:`accord.data.references`); the
tokens (and so the number of subjects) come from the data. Each step, per sample:

* **union sampling** — a random non-empty subset of the image's subjects is drawn (``method.bas_union_sampling``)
  and the prompt names them: ``"a photo of <asset1> and <asset0>"`` (plus the image's explicit
  ``general`` context phrases from the metadata, if any);
* **masked diffusion loss** — the error is zeroed outside the union of the chosen subjects' masks
  (:meth:`BreakAScene.loss_mask`);
* **cross-attention loss** — each chosen token's cross-attention map, averaged over heads and the UNet
  layers of one resolution, is matched to its mask (:func:`accord.losses.cross_attention_mask_loss`,
  weight ``method.bas_attn_weight``), recorded by :class:`AttentionRecorder` on the ``attn2`` layers;
* **DDLoss per subject token** — for each chosen subject ``i``, ``c_p = "a photo of <asset_i>"`` and
  ``c_g`` is the rest of the caption: the other chosen tokens (``"a photo of <asset_j> and …"``) and the
  context. The DD term is averaged over all (sample, subject) terms, so a sample naming two subjects
  contributes two terms; a sample naming one subject and no context has no ``c_g`` and no DD term.

Two phases (paper Sec. 3): for ``method.bas_phase1_steps`` steps only the token embeddings train, at
``method.bas_phase1_lr``; then the tokens and a UNet LoRA (``method.lora_*``) train together at
``train.learning_rate`` (the paper fine-tunes the whole UNet at 2e-6; LoRA is the lighter stand-in).

Outputs: ``learned_embeds.safetensors``, each token also as ``<token>.safetensors`` (diffusers' single-token
format), ``pytorch_lora_weights.safetensors`` when phase 2 ran, and ``break_a_scene.json`` listing them.
SD 1.x/2.x: one entry per token (``{token: [1, dim]}``); a stock pipeline loads them with::

    state = safetensors.torch.load_file(OUT / "learned_embeds.safetensors")
    pipe.load_textual_inversion(list(state.values()), token=list(state))
    pipe.load_lora_weights(OUT, weight_name="pytorch_lora_weights.safetensors")  # if present

SDXL: the tokens train in both text encoders; ``learned_embeds.safetensors`` is ``{"clip_l": [S, 768],
"clip_g": [S, 1280]}`` in the manifest's token order (each ``<token>.safetensors`` is diffusers' SDXL
``clip_l``/``clip_g`` file), loaded with one ``load_textual_inversion`` call per encoder::

    tokens = json.loads((OUT / "break_a_scene.json").read_text())["tokens"]
    pipe.load_textual_inversion(list(state["clip_l"]), token=tokens, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(list(state["clip_g"]), token=tokens, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import _f
from ..errors import ConfigError
from .base import Method, load_named_state, named_trainable_state, register
from .lora import LORA_FILE, LoraAdapterOptions, lora_config
from .textual_inversion import (
    SDXL_KEYS,
    TI_FILE,
    LearnedTokenOptions,
    LearnedTokens,
    load_sdxl_embeddings,
    unload_embeddings,
)

MANIFEST = "break_a_scene.json"


class AttentionRecorder:
    """Cross-attention processor that, while :attr:`active`, computes the softmaxed probabilities
    explicitly (diffusers' ``AttnProcessor`` path) and keeps their mean over heads, ``[B, h·w, tokens]``,
    in :attr:`maps`; otherwise it calls the processor it replaced."""

    def __init__(self, inner, store: dict):
        self.inner, self.store = inner, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if not self.store["active"] or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B·heads, h·w, tokens], rows sum to 1
        self.store["maps"].append(probs.unflatten(0, (batch_size, -1)).mean(1))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_recorders(unet) -> dict:
    """Put an :class:`AttentionRecorder` on every cross-attention layer; returns their shared store."""
    store = {"active": False, "maps": []}
    for module in unet.modules():
        if getattr(module, "is_cross_attention", False) and hasattr(module, "set_processor"):
            module.set_processor(AttentionRecorder(module.processor, store))
    return store


def subject_maps(maps: list[torch.Tensor], positions: torch.Tensor, size: tuple[int, int], side: int | None):
    """``[B, S, h, w]`` maps of the tokens at ``positions`` ``[B, S]`` (any value where unused), averaged over
    the recorded layers of one resolution: ``side`` or, by default, the one closest to the latent side / 4."""
    H, W = size
    by_side: dict[int, list[torch.Tensor]] = {}
    for m in maps:
        h = round((m.shape[1] * H / W) ** 0.5)
        by_side.setdefault(h, []).append(m)
    if side is None:
        side = min(by_side, key=lambda s: (abs(s - H / 4), s))
    if side not in by_side:
        from ..errors import ConfigError

        raise ConfigError(f"method.bas_attn_resolution={side}: the UNet's cross-attention maps are "
                          f"{sorted(by_side)} pixels on a side here; choose one of them or null")
    mean = torch.stack(by_side[side]).mean(0)  # [B, h·w, tokens]
    picked = torch.gather(mean, 2, positions.clamp_min(0)[:, None, :].expand(-1, mean.shape[1], -1))
    h = side
    return picked.transpose(1, 2).unflatten(2, (h, mean.shape[1] // h))


@dataclass
class BreakASceneOptions(LoraAdapterOptions, LearnedTokenOptions):
    no_masked_loss = "masks its loss by its per-subject 'masks'"

    bas_token_prefix: str = _f(
        "<asset", "subject tokens (the keys of metadata.jsonl 'masks', one per subject: <asset0>, <asset1>, ...) "
        "must start with this; the number of subjects is read from the data"
    )
    bas_phase1_steps: int = _f(
        400, "steps of phase 1 (only the subject tokens train, at bas_phase1_lr); the remaining train.max_steps are "
        "phase 2 (tokens + UNet LoRA at train.learning_rate; paper: 400 + 400 at 5e-4 / 2e-6)"
    )
    bas_phase1_lr: float = _f(5e-4, "learning rate of the subject tokens in phase 1")
    bas_attn_weight: float = _f(
        0.01, "weight of the cross-attention mask loss (paper lambda_attn: 0.01); 0 skips the capture"
    )
    bas_attn_resolution: int | None = _f(
        None, "side of the cross-attention maps the mask loss uses (paper: 16 at 512 px); default: the UNet's "
        "cross-attention side closest to latent side / 4"
    )
    bas_union_sampling: bool = _f(
        True, "each sample names a random non-empty subset of its subjects and the diffusion loss is masked to their "
        "union (False: always all subjects)"
    )

    def validate(self, config) -> None:
        super().validate(config)
        d = config.data
        if d.caption_dropout or d.shuffle_phrases or d.instance_dirs:
            raise ConfigError("data.caption_dropout, data.shuffle_phrases and data.instance_dirs are not for "
                              "break_a_scene (it writes its own prompts from one folder's masks); unset them")
        if self.bas_phase1_steps < 0 or self.bas_phase1_lr <= 0 or self.bas_attn_weight < 0:
            raise ConfigError("method.bas_phase1_steps and method.bas_attn_weight must be >= 0 and "
                              "method.bas_phase1_lr > 0")


@register
class BreakAScene(Method):
    name = "break_a_scene"
    options = BreakASceneOptions
    output_file = MANIFEST
    lora_files = (LORA_FILE,)
    trains_text = True
    families = ("sd", "sdxl")

    def setup(self) -> None:
        from ..data.references import read_subject_tokens
        from ..errors import ConfigError

        super().setup()
        m, d = self.config.method, self.config.data
        self.tokens = read_subject_tokens(d.instance_dir)
        if not self.tokens:
            raise ConfigError(f"{d.instance_dir}: metadata.jsonl names no subject masks; give each image "
                              '"masks": {"<asset0>": "m0.png", "<asset1>": "m1.png"}')
        wrong = [t for t in self.tokens if not t.startswith(m.bas_token_prefix) or " " in t]
        if wrong:
            raise ConfigError(f"subject tokens {wrong} do not start with "
                              f"method.bas_token_prefix={m.bas_token_prefix!r}; "
                              "rename them in metadata.jsonl (e.g. <asset0>) or change the prefix")
        self.learned = LearnedTokens(self.backbone, self.tokens, m.initializer_token or d.class_noun)
        self.phase2 = self.config.train.max_steps > m.bas_phase1_steps
        if self.phase2:
            self.backbone.denoiser.add_adapter(lora_config(m, m.lora_targets, conv=True))  # method.lora_variant too
        self._store = install_recorders(self.backbone.denoiser) if m.bas_attn_weight > 0 else None

    # -- what trains, and when --------------------------------------------------------------------
    def trainable_modules(self):
        """Every text encoder (their new token rows), then the UNet in phase 2."""
        return list(self.backbone.text_encoders) + ([self.backbone.denoiser] if self.phase2 else [])

    def _unet(self):
        return self.unwrapped_modules()[len(self.backbone.text_encoders)]

    def param_groups(self):
        """Group 0: the token rows of every text encoder, at ``method.bas_phase1_lr``; group 1: the UNet LoRA."""
        modules = self.trainable_modules()
        encoders, unet = modules[:len(self.backbone.text_encoders)], modules[len(self.backbone.text_encoders):]
        groups = [{"params": [p for e in encoders for p in e.parameters() if p.requires_grad],
                   "lr": self.config.method.bas_phase1_lr}]
        if unet:
            groups.append({"params": [p for p in unet[0].parameters() if p.requires_grad]})
        return groups

    def before_optimizer_step(self, step: int, optimizer) -> None:
        """Phase 1: the UNet's gradients are dropped (AdamW skips parameters without one). Phase 2: the
        tokens follow the UNet's learning rate (the schedule's value for ``train.learning_rate``, times
        ``train.embedding_lr / train.learning_rate`` when that is set)."""
        if not self.phase2:
            return
        if step < self.config.method.bas_phase1_steps:
            for p in optimizer.param_groups[1]["params"]:
                p.grad = None
        else:  # train.embedding_lr, when set, keeps its ratio to the schedule's value for train.learning_rate
            t = self.config.train
            ratio = 1.0 if t.embedding_lr is None else t.embedding_lr / t.learning_rate
            optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] * ratio

    def after_optimizer_step(self) -> None:
        self.learned.restore_frozen_rows()

    # -- the step ---------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        from ..data.captions import join_phrases
        from ..errors import DataError

        if "subject_masks" not in batch or batch["subject_masks"].shape[1] != len(self.tokens):
            raise DataError(f"break_a_scene needs every subject mask of metadata.jsonl ({', '.join(self.tokens)}); "
                            "an image of the folder was skipped or has no \"masks\"")
        present = batch["subject_present"]
        chosen = torch.zeros_like(present)
        captions, personal, general, dd = [], [], [], []
        positions = torch.full(present.shape, -1, dtype=torch.long)
        for b in range(len(present)):
            idx = present[b].nonzero().flatten().tolist()
            if not idx:
                raise DataError(f"image {int(batch['index'][b])} of the reference folder has no subject mask")
            if self.config.method.bas_union_sampling:
                k = 1 + int(torch.randint(len(idx), (), generator=generator))
                idx = [idx[i] for i in torch.randperm(len(idx), generator=generator)[:k].tolist()]
            chosen[b, idx] = True
            names = [self.tokens[i] for i in idx]
            context = batch["general"][b]
            captions.append(join_phrases([f"a photo of {' and '.join(names)}"] + ([context] if context else [])))
            for _i, name in zip(idx, names):
                others = [n for n in names if n != name]
                rest = join_phrases(([f"a photo of {' and '.join(others)}"] if others else [])
                                    + ([context] if context else []))
                if rest:
                    dd.append((b, f"a photo of {name}", rest))
            personal.append(f"a photo of {names[0]}")
            general.append(join_phrases(([f"a photo of {' and '.join(names[1:])}"] if names[1:] else []) +
                                        ([context] if context else [])))
        if self._store is not None:  # where each chosen token sits in its prompt's token ids
            tokenizer = self.backbone.tokenizers[0]
            ids = tokenizer(self.backbone.prepare_prompts(captions), padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
            token_ids = tokenizer.convert_tokens_to_ids(self.tokens)
            for b, s in chosen.nonzero().tolist():
                positions[b, s] = int((ids[b] == token_ids[s]).nonzero()[0])
        return {**batch, "caption": captions, "personal": personal, "general": general, "bas_chosen": chosen,
                "bas_dd": dd, "bas_positions": positions}

    def loss_mask(self, batch: dict) -> torch.Tensor:
        """The union of the chosen subjects' masks, ``[B, 1, H, W]``."""
        chosen = batch["bas_chosen"].to(batch["subject_masks"].dtype)[:, :, None, None, None]
        return (batch["subject_masks"] * chosen).amax(1)

    def dd_conditions(self, batch: dict) -> list[tuple[int, str, str]]:
        return list(batch["bas_dd"])

    def capture(self):
        if self._store is None:
            return contextlib.nullcontext()
        return self._recording()

    @contextlib.contextmanager
    def _recording(self):
        self._store["active"], self._store["maps"] = True, []
        try:
            yield
        finally:
            self._store["active"] = False

    def extra_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        from ..losses import cross_attention_mask_loss

        if self._store is None or not self._store["maps"]:
            return {}
        n = len(batch["caption"])
        masks = batch["subject_masks"][:, :, 0]  # [B, S, H, W]
        maps = [m[:n] for m in self._store["maps"]]
        self._store["maps"] = []
        attention = subject_maps(maps, batch["bas_positions"].to(maps[0].device), tuple(masks.shape[-2:]),
                                 self.config.method.bas_attn_resolution)
        target = F.interpolate(masks, size=attention.shape[-2:], mode="area").to(attention.device)
        per, _ = cross_attention_mask_loss(attention, target, batch["bas_chosen"].to(attention.device))
        return {"attn": self.config.method.bas_attn_weight * per.mean()}

    # -- checkpoints and outputs ------------------------------------------------------------------
    def trainable_state(self):
        state = self.learned.state("tokens")
        if self.phase2:
            state.update(named_trainable_state(self._unet(), "unet"))
        return state

    def load_trainable_state(self, state):
        self.learned.load_state("tokens", state)
        if self.phase2:
            load_named_state(self._unet(), "unet", state)

    def write_weights(self, output_dir: Path) -> list[Path]:
        from safetensors.torch import save_file

        output_dir = Path(output_dir)
        rows = self.learned.rows()
        sdxl = self.backbone.family == "sdxl"
        if sdxl:  # diffusers' SDXL embedding keys, all tokens in one file, one token per file beside it
            embeds = dict(zip(SDXL_KEYS, rows))
            single = {t: {k: r[i : i + 1].contiguous() for k, r in zip(SDXL_KEYS, rows)}
                      for i, t in enumerate(self.tokens)}
        else:
            embeds = {t: rows[0][i : i + 1].contiguous() for i, t in enumerate(self.tokens)}
            single = {t: {t: v} for t, v in embeds.items()}
        save_file(embeds, str(output_dir / TI_FILE), metadata={"tokens": json.dumps(self.tokens)})
        written = [output_dir / TI_FILE]
        for token, tensors in single.items():
            save_file(tensors, str(output_dir / f"{token}.safetensors"), metadata={"token": token})
            written.append(output_dir / f"{token}.safetensors")
        lora = None
        if self.phase2:
            from peft.utils import get_peft_model_state_dict

            from .lora import unet_lora_layers

            unet = self._unet()
            self.backbone.pipeline_class.save_lora_weights(
                output_dir, safe_serialization=True,
                unet_lora_layers=unet_lora_layers(get_peft_model_state_dict(unet), self.config.method),
                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
            lora = LORA_FILE
            written.append(output_dir / LORA_FILE)
        (output_dir / MANIFEST).write_text(
            json.dumps({"tokens": self.tokens, "embeddings": TI_FILE, "lora": lora}, indent=2))
        return written + [output_dir / MANIFEST]

    def loading_code(self, run: str, base: str) -> str:
        from .textual_inversion import pipeline_lines

        code = pipeline_lines(self.backbone, base, True)
        embeds = f"{run}/{TI_FILE}"
        if self.backbone.family == "sdxl":
            code += (f"state = load_file({embeds!r})  # every subject token in one call per text encoder\n"
                     f"tokens = {self.tokens!r}  # break_a_scene.json: tokens, in the rows' order\n"
                     "pipe.load_textual_inversion(list(state['clip_l']), token=tokens, text_encoder=pipe.text_encoder, "
                     "tokenizer=pipe.tokenizer)\n"
                     "pipe.load_textual_inversion(list(state['clip_g']), token=tokens, "
                     "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)\n")
        else:
            code += (f"state = load_file({embeds!r})  # every subject token in one call\n"
                     "pipe.load_textual_inversion(list(state.values()), token=list(state))\n")
        if self.phase2:
            code += f"pipe.load_lora_weights({run!r}, weight_name={LORA_FILE!r})\n"
        return code

    def readme_notes(self) -> list[str]:
        one = "`pipe.load_textual_inversion(run_dir, weight_name=\"<token>.safetensors\")`" \
            if self.backbone.family != "sdxl" else "the two-call SDXL recipe (`clip_l`/`clip_g`)"
        notes = [f"- `{TI_FILE}`: all {len(self.tokens)} subject tokens ({', '.join(f'`{t}`' for t in self.tokens)}); "
                 "`load_textual_inversion(run_dir)` alone rejects a file holding several tokens, so load it with the "
                 "token list as above",
                 f"- per-token files, one token each ({one}): "
                 + ", ".join(f"`{t}.safetensors`" for t in self.tokens),
                 f"- `{MANIFEST}`: the tokens in order, the embeddings file and the LoRA file"]
        if self.phase2:
            notes.append(f"- `{LORA_FILE}`: the phase-2 UNet LoRA (`load_lora_weights`)")
        return notes

    @staticmethod
    def load_into(pipeline, output_dir: Path) -> None:
        from safetensors.torch import load_file

        output_dir = Path(output_dir)
        manifest = json.loads((output_dir / MANIFEST).read_text())
        state = load_file(str(output_dir / manifest["embeddings"]))
        if SDXL_KEYS[0] in state:  # SDXL: one call per text encoder, tokens in the manifest's order
            load_sdxl_embeddings(pipeline, state, manifest["tokens"])
        else:
            pipeline.load_textual_inversion(list(state.values()), token=list(state))
        if manifest.get("lora"):
            pipeline.load_lora_weights(str(output_dir), weight_name=manifest["lora"])

    @staticmethod
    def unload_from(pipeline) -> bool:
        unload_embeddings(pipeline)
        if getattr(pipeline, "get_list_adapters", None) and pipeline.get_list_adapters():
            pipeline.unload_lora_weights()
        return True
