"""Textual inversion (Gal et al., 2022): learn new token embeddings, everything else frozen.

``method.num_vectors`` vectors are learned as tokens ``<s*>``, ``<s*>_1``, …; captions carry only
the placeholder, which :meth:`TextualInversion.transform_prompt` expands into all vector tokens
(the stock pipelines do the same through ``maybe_convert_prompt``). For SDXL the token is learned
in both text encoders. The learned c_p is an embedding, so PDLoss applies.

Output ``learned_embeds.safetensors``: for SD 1.x/2.x ``{token: tensor[num_vectors, dim]}`` (as
diffusers' ``textual_inversion.py`` writes it); for SDXL ``{"clip_l": …, "clip_g": …}`` (diffusers'
SDXL format). The token is also kept in the file's metadata (``token``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import MethodOptions, _f
from ..errors import ConfigError
from .base import Method, register

TI_FILE = "learned_embeds.safetensors"
#: diffusers' SDXL embedding keys, in text-encoder order
SDXL_KEYS = ("clip_l", "clip_g")


class LearnedTokens:
    """New rows of every text encoder's embedding table; only they change.

    The gradient of the other rows is masked to zero (so gradient clipping and Adam see only the
    learned rows) and, after each optimizer step, the other rows are restored from a copy of the
    original table (so AdamW's decoupled weight decay cannot move them either).
    """

    def __init__(self, backbone, tokens: list[str], initializer: str):
        self.tokens = tokens
        self.ids = backbone.add_tokens(tokens, initializer)
        self.weights, self._originals = [], []
        for encoder, ids in zip(backbone.text_encoders, self.ids):
            weight = encoder.get_input_embeddings().weight
            weight.requires_grad_(True)
            learned = torch.zeros(weight.shape[0], 1, dtype=torch.bool)
            learned[ids] = True
            weight.register_hook(lambda grad, m=learned: grad * m.to(grad.device, grad.dtype))
            self.weights.append(weight)
            self._originals.append(weight.detach().clone())

    def restore_frozen_rows(self) -> None:
        with torch.no_grad():
            for k, (weight, ids) in enumerate(zip(self.weights, self.ids)):
                original = self._originals[k]
                if original.device != weight.device or original.dtype != weight.dtype:
                    original = self._originals[k] = original.to(weight.device, weight.dtype)
                learned = weight[ids].clone()
                weight.copy_(original)
                weight[ids] = learned

    def rows(self) -> list[torch.Tensor]:
        """The learned vectors per text encoder, ``[len(tokens), dim]`` each, on the CPU."""
        return [w[ids].detach().float().cpu().clone().contiguous() for w, ids in zip(self.weights, self.ids)]

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{i}": rows for i, rows in enumerate(self.rows())}

    def load_state(self, prefix: str, state: dict[str, torch.Tensor]) -> None:
        from ..errors import AccordError

        with torch.no_grad():
            for i, (weight, ids) in enumerate(zip(self.weights, self.ids)):
                key = f"{prefix}.{i}"
                if key not in state or state[key].shape != (len(ids), weight.shape[1]):
                    raise AccordError(f"checkpoint lacks the learned token rows {key} of shape "
                                      f"{(len(ids), weight.shape[1])}; "
                                      "was it made by another method or with another method.num_vectors?")
                weight[ids] = state[key].to(weight.device, weight.dtype)

    def save(self, path: Path, token: str, family: str) -> Path:
        """One file in diffusers' embedding format: ``{token: rows}`` (one encoder) or SDXL's ``clip_l``/``clip_g``."""
        from safetensors.torch import save_file

        rows = self.rows()
        tensors = {token: rows[0]} if family != "sdxl" else dict(zip(SDXL_KEYS, rows))
        save_file(tensors, str(path), metadata={"token": token})
        return path


def load_sdxl_embeddings(pipeline, state: dict, token: str | list[str]) -> None:
    """SDXL embeddings (``clip_l``/``clip_g``) into a stock pipeline: one ``load_textual_inversion`` call per text
    encoder. ``token`` is one token (its rows are its vectors) or a list of tokens (one row each)."""
    for key, encoder, tokenizer in zip(SDXL_KEYS, ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")):
        rows = state[key] if isinstance(token, str) else list(state[key])
        pipeline.load_textual_inversion(rows, token=token, text_encoder=getattr(pipeline, encoder),
                                        tokenizer=getattr(pipeline, tokenizer))


def load_embedding_file(pipeline, path: Path) -> str:
    """Load an embedding file written by :meth:`LearnedTokens.save` into a stock pipeline; returns its token.

    SD 1.x/2.x: ``pipeline.load_textual_inversion(folder, weight_name=name)``. SDXL files hold two
    tensors, one per text encoder, so they take two calls (diffusers' documented SDXL recipe)::

        state = safetensors.torch.load_file(path)
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..errors import ModelLoadError

    if not path.is_file():
        raise ModelLoadError(f"{path} not found; point at the output folder of a finished run "
                             "(or a checkpoints/step-N folder)")
    with safe_open(str(path), framework="pt") as f:
        token = (f.metadata() or {}).get("token")
    state = load_file(str(path))
    if set(state) == set(SDXL_KEYS):
        if token is None:
            raise ModelLoadError(f"{path} holds SDXL embeddings without a token name in its metadata; load it with "
                                 "load_textual_inversion(..., token=YOUR_TOKEN) for each text encoder")
        load_sdxl_embeddings(pipeline, state, token)
        return token
    pipeline.load_textual_inversion(str(path.parent), weight_name=path.name)
    return token or next(iter(state))


def embedding_loading_code(run: str, file: str, token: str, family: str) -> str:
    """Stock lines that load one embedding file written by :meth:`LearnedTokens.save` (SDXL: one call per encoder)."""
    if family != "sdxl":
        return f"pipe.load_textual_inversion({run!r}, weight_name={file!r})\n"
    return (f"state = load_file({run + '/' + file!r})\n"
            f"pipe.load_textual_inversion(state['clip_l'], token={token!r}, text_encoder=pipe.text_encoder, "
            "tokenizer=pipe.tokenizer)\n"
            f"pipe.load_textual_inversion(state['clip_g'], token={token!r}, text_encoder=pipe.text_encoder_2, "
            "tokenizer=pipe.tokenizer_2)\n")


def pipeline_lines(backbone, base: str, sdxl_state: bool = False) -> str:
    """The imports and ``from_pretrained`` line every loading snippet starts with."""
    cls = backbone.pipeline_class.__name__
    imports = f"from diffusers import {cls}\n" + ("from safetensors.torch import load_file\n" if sdxl_state else "")
    return f"{imports}\npipe = {cls}.from_pretrained({base!r})\n"


def unload_embeddings(pipeline) -> None:
    """Remove every added token from each tokenizer / text encoder (``unload_textual_inversion``)."""
    pipeline.unload_textual_inversion()
    if getattr(pipeline, "text_encoder_2", None) is not None:
        pipeline.unload_textual_inversion(tokenizer=pipeline.tokenizer_2, text_encoder=pipeline.text_encoder_2)


def vector_tokens(token: str, num_vectors: int) -> list[str]:
    """``<s*>``, ``<s*>_1``, … — the names diffusers' loader gives multi-vector embeddings."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def check_learned_trigger(config, key: str, learns: str) -> None:
    """The caption's trigger must be the token a method learns (``method.<key>``): one line naming both if not."""
    token = getattr(config.method, key)
    if config.data.trigger != token:
        raise ConfigError(f"data.trigger={config.data.trigger!r} differs from method.{key}={token!r}: {learns}, set "
                          "both to the same token")


@dataclass
class LearnedTokenOptions(MethodOptions):
    """Options of methods that learn new token embeddings (textual_inversion, custom_diffusion, break_a_scene)."""

    initializer_token: str | None = _f(None, "initialise the new tokens from this word; default data.class_noun")


@dataclass
class TextualInversionOptions(LearnedTokenOptions):
    supports_masked_loss = True

    placeholder_token: str = _f("<s*>", "the learned token (use it as data.trigger)")
    num_vectors: int = _f(1, "vectors per learned token")

    def validate(self, config) -> None:
        super().validate(config)
        check_learned_trigger(config, "placeholder_token", "textual inversion learns the trigger")


@register
class TextualInversion(Method):
    name = "textual_inversion"
    options = TextualInversionOptions
    output_file = TI_FILE
    learns_personal_embedding = True
    trains_text = True

    def setup(self) -> None:
        from ..errors import ConfigError

        super().setup()
        m = self.config.method
        if m.num_vectors < 1:
            raise ConfigError(f"method.num_vectors={m.num_vectors}: use 1 or more vectors per learned token")
        self.token = m.placeholder_token
        self.learned = LearnedTokens(self.backbone, vector_tokens(self.token, m.num_vectors),
                                     m.initializer_token or self.config.data.class_noun)
        self._expanded = " ".join(self.learned.tokens)

    def transform_prompt(self, prompt: str) -> str:
        from ..data.captions import trigger_pattern

        if len(self.learned.tokens) == 1:
            return prompt
        return trigger_pattern(self.token).sub(self._expanded, prompt)

    def trainable_modules(self):
        return list(self.backbone.text_encoders)

    def after_optimizer_step(self) -> None:
        self.learned.restore_frozen_rows()

    def trainable_state(self):
        return self.learned.state("tokens")

    def load_trainable_state(self, state):
        self.learned.load_state("tokens", state)

    def write_weights(self, output_dir: Path) -> list[Path]:
        return [self.learned.save(Path(output_dir) / TI_FILE, self.token, self.backbone.family)]

    def loading_code(self, run: str, base: str) -> str:
        family = self.backbone.family
        return (pipeline_lines(self.backbone, base, family == "sdxl")
                + embedding_loading_code(run, TI_FILE, self.token, family))

    def readme_notes(self) -> list[str]:
        vectors = len(self.learned.tokens)
        expand = (f"; its {vectors} vectors load as `{'`, `'.join(self.learned.tokens)}`, "
                  "the pipeline expands the token" if vectors > 1 else "")
        return [f"- `{TI_FILE}`: the token `{self.token}`{expand} (A1111/ComfyUI embeddings folder too); the header "
                "holds the token name, kohya's `ss_*` metadata and an `accord` block"]

    @staticmethod
    def load_into(pipeline, output_dir: Path) -> None:
        """SD: ``pipe.load_textual_inversion(OUT, weight_name="learned_embeds.safetensors")``. SDXL: two calls,
        one per text encoder (see :func:`load_embedding_file`). Multi-vector tokens are expanded in prompts
        by the pipeline itself."""
        load_embedding_file(pipeline, Path(output_dir) / TI_FILE)

    @staticmethod
    def unload_from(pipeline) -> bool:
        unload_embeddings(pipeline)
        return True
