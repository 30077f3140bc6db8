"""Custom Diffusion (Kumari et al., 2023): cross-attention key/value projections + a modifier token.

Each cross-attention layer gets diffusers' ``CustomDiffusionAttnProcessor2_0`` holding trainable
copies of its ``to_k``/``to_v`` (and ``to_q``/``to_out`` with ``method.train_q_out``); the original
projections stay frozen. The modifier token (``method.modifier_token``, default ``<new1>``) is a new
embedding row trained like textual inversion, so PDLoss applies. The paper's baselines train with
the class-prior loss (``data.with_prior_preservation``). Adapted from diffusers'
``examples/custom_diffusion/train_custom_diffusion.py`` (processor set-up and output format).

Outputs: ``pytorch_custom_diffusion_weights.safetensors`` and ``<new1>.safetensors`` (the token embedding,
textual-inversion format; SDXL: ``clip_l``/``clip_g``). The weights file is ``unet.save_attn_procs``'s, with
one entry for every attention layer, as the training script's ``.bin`` has it: safetensors cannot hold the
empty dict that marks a pass-through (self-attention) processor, so ``save_attn_procs`` drops those entries
and stock ``load_attn_procs`` then refuses the file on the processor count; an empty tensor under the
processor's name is what diffusers' ``_process_custom_diffusion`` reads as that marker. Stock loading::

    pipe.unet.load_attn_procs(OUT, weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=pipe)

(``_pipeline``: diffusers 0.42 installs the processors it builds only when given it, huggingface/diffusers#9320.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import _f
from .base import Method, load_named_state, named_trainable_state, register
from .textual_inversion import (
    LearnedTokenOptions,
    LearnedTokens,
    check_learned_trigger,
    load_embedding_file,
    unload_embeddings,
)

CD_FILE = "pytorch_custom_diffusion_weights.safetensors"


def _attention(unet, processor_name: str):
    module = unet
    for part in processor_name.split(".")[:-1]:  # "...attn2.processor" -> the Attention module
        module = getattr(module, part)
    return module


def custom_diffusion_processors(unet, train_q_out: bool) -> dict:
    """One processor per attention layer: trainable k/v(/q/out) copies on cross-attention, pass-through elsewhere."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    procs = {}
    for name in unet.attn_processors:
        attn = _attention(unet, name)
        if not attn.is_cross_attention:
            procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
            continue
        proc = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=train_q_out,
                                               hidden_size=attn.to_k.out_features,
                                               cross_attention_dim=attn.to_k.in_features,
                                               out_bias=attn.to_out[0].bias is not None)
        weights = {"to_k_custom_diffusion.weight": attn.to_k.weight, "to_v_custom_diffusion.weight": attn.to_v.weight}
        if train_q_out:
            weights["to_q_custom_diffusion.weight"] = attn.to_q.weight
            weights["to_out_custom_diffusion.0.weight"] = attn.to_out[0].weight
            if attn.to_out[0].bias is not None:
                weights["to_out_custom_diffusion.0.bias"] = attn.to_out[0].bias
        proc.load_state_dict({k: v.detach().clone() for k, v in weights.items()})
        procs[name] = proc.to(attn.to_k.weight.device, attn.to_k.weight.dtype)
    return procs


def load_custom_diffusion_weights(unet, path: Path) -> None:
    """Put the processors of a ``save_attn_procs`` file into ``unet``, without a pipeline.

    diffusers 0.42's ``unet.load_attn_procs(folder, weight_name=...)`` builds these processors but
    sets them only when called with its private ``_pipeline`` argument (huggingface/diffusers#9320).
    So the processors are built by diffusers' own ``_process_custom_diffusion``; layers a file has no
    entry for (files of earlier accord versions dropped the self-attention ones) get pass-through ones.
    """
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
    from safetensors.torch import load_file

    from ..errors import ModelLoadError

    if not path.is_file():
        raise ModelLoadError(f"{path} not found; point at the output folder of a finished custom_diffusion run")
    loaded = unet._process_custom_diffusion(state_dict=load_file(str(path)))
    procs = {name: loaded.pop(name, None) or CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
             for name in unet.attn_processors}
    if loaded:
        raise ModelLoadError(f"{path} holds processors for layers this UNet lacks ({sorted(loaded)[0]}, …); "
                             "load it into the base model it was trained from")
    for proc in procs.values():
        proc.to(unet.device, unet.dtype)
    unet.set_attn_processor(procs)


@dataclass
class CustomDiffusionOptions(LearnedTokenOptions):
    supports_masked_loss = True

    modifier_token: str = _f("<new1>", "the modifier token (use it as data.trigger)")
    train_q_out: bool = _f(False, "also train to_q and to_out of cross-attention")

    def validate(self, config) -> None:
        super().validate(config)
        check_learned_trigger(config, "modifier_token", "custom diffusion learns the modifier token")


@register
class CustomDiffusion(Method):
    name = "custom_diffusion"
    options = CustomDiffusionOptions
    output_file = CD_FILE
    learns_personal_embedding = True
    trains_text = True

    def setup(self) -> None:
        super().setup()
        m = self.config.method
        self.token = m.modifier_token
        self.learned = LearnedTokens(self.backbone, [self.token], m.initializer_token or self.config.data.class_noun)
        unet = self.backbone.denoiser
        procs = custom_diffusion_processors(unet, m.train_q_out)
        unet.set_attn_processor(dict(procs))  # (set_attn_processor empties the dict it is given)
        for proc in procs.values():
            proc.requires_grad_(True)  # the rest of the UNet was frozen by super().setup()

    def trainable_modules(self):
        return [self.backbone.denoiser, *self.backbone.text_encoders]

    def _unet(self):
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(self.backbone.denoiser)

    def after_optimizer_step(self) -> None:
        self.learned.restore_frozen_rows()

    def trainable_state(self):
        return {**named_trainable_state(self._unet(), "unet"), **self.learned.state("tokens")}

    def load_trainable_state(self, state):
        load_named_state(self._unet(), "unet", {k: v for k, v in state.items() if k.startswith("unet.")})
        self.learned.load_state("tokens", state)

    def write_weights(self, output_dir: Path) -> list[Path]:
        import torch
        from safetensors.torch import load_file, save_file

        output_dir = Path(output_dir)
        unet = self._unet()
        unet.save_attn_procs(str(output_dir), weight_name=CD_FILE, safe_serialization=True)
        state = load_file(str(output_dir / CD_FILE))
        for name in unet.attn_processors:  # the pass-through layers save_attn_procs drops from safetensors
            if not any(k.startswith(name + ".") for k in state):
                state[name] = torch.zeros(0)
        save_file(state, str(output_dir / CD_FILE), metadata={"format": "pt"})
        token_file = self.learned.save(output_dir / f"{self.token}.safetensors", self.token, self.backbone.family)
        return [output_dir / CD_FILE, token_file]

    def loading_code(self, run: str, base: str) -> str:
        from .textual_inversion import embedding_loading_code, pipeline_lines

        family = self.backbone.family
        return (pipeline_lines(self.backbone, base, family == "sdxl")
                + "# _pipeline: diffusers 0.42 installs the processors only when given it "
                "(huggingface/diffusers#9320)\n"
                f"pipe.unet.load_attn_procs({run!r}, weight_name={CD_FILE!r}, _pipeline=pipe)\n"
                + embedding_loading_code(run, f"{self.token}.safetensors", self.token, family))

    def readme_notes(self) -> list[str]:
        return [f"- `{CD_FILE}`: one `CustomDiffusionAttnProcessor` per attention layer (k/v weights on "
                "cross-attention, pass-through entries elsewhere), diffusers' `train_custom_diffusion.py` layout",
                f"- `{self.token}.safetensors`: the modifier token (textual-inversion format); "
                f"use `{self.token}` in prompts"]

    @staticmethod
    def load_into(pipeline, output_dir: Path) -> None:
        """Attention processors from ``pytorch_custom_diffusion_weights.safetensors`` (see
        :func:`load_custom_diffusion_weights` for why not plain ``unet.load_attn_procs``) and the
        modifier token from its ``<token>.safetensors`` file (SD: ``pipe.load_textual_inversion(OUT,
        weight_name="<new1>.safetensors")``; SDXL: one call per text encoder)."""
        from ..errors import ModelLoadError

        output_dir = Path(output_dir)
        load_custom_diffusion_weights(pipeline.unet, output_dir / CD_FILE)
        token_files = [p for p in output_dir.glob("*.safetensors") if p.name != CD_FILE and p.name.startswith("<")]
        if len(token_files) != 1:
            raise ModelLoadError(f"{output_dir}: expected one modifier-token file like '<new1>.safetensors' "
                                 f"next to {CD_FILE}, found {len(token_files)}")
        load_embedding_file(pipeline, token_files[0])

    @staticmethod
    def unload_from(pipeline) -> bool:
        """Back to the default attention processors (what the base UNet uses) and no modifier token."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipeline.unet.set_attn_processor(AttnProcessor2_0())
        unload_embeddings(pipeline)
        return True
