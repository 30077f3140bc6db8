"""DreamBooth (Ruiz et al., 2023): fine-tune the whole UNet (and optionally the text encoders).

The class-prior loss is on with ``data.with_prior_preservation`` (the loop adds the class batches).
Output: the full pipeline, ``save_pretrained`` with safetensors, at the top of the output folder, so
``StableDiffusionPipeline.from_pretrained(OUT)`` (or ``StableDiffusionXLPipeline``) loads it; the
``checkpoints/``, ``logs/`` and ``config.yaml`` beside it are ignored by diffusers. Components the run
did not train are written as they were held in training (in the ``train.mixed_precision`` dtype).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

from ..config import _f
from .base import Method, TextEncoderOptions, register


@dataclass
class DreamBoothOptions(TextEncoderOptions):
    supports_masked_loss = True
    folder_triggers = True

    frozen_anchor: bool = _f(
        True, "with a DDLoss variant that reads the superclass through the base model (accord.dd_variant anchored, "
        "alignment, conditional), keep a frozen copy of the base denoiser for it: one more denoiser in memory "
        "(SD 1.5's UNet: 3.4 GB in fp32, 1.7 GB in bf16; SDXL's: 10 / 5 GB); false predicts the anchor with the "
        "weights being trained (no memory, but the anchor drifts with them)"
    )


@register
class DreamBooth(Method):
    name = "dreambooth"
    options = DreamBoothOptions
    output_file = "model_index.json"

    def setup(self) -> None:
        from ..losses.dd_variants import ANCHORED

        super().setup()
        self.trains_text = bool(self.config.method.train_text_encoder)
        a = self.config.accord
        self._anchor = None  # the base denoiser, frozen (taken before any training step or resume)
        if self.config.method.frozen_anchor and a.dd_weight > 0 and a.dd_variant in ANCHORED:
            self._anchor = copy.deepcopy(self.backbone.denoiser).requires_grad_(False).eval()
        for module in self.trainable_modules():
            module.requires_grad_(True)

    @contextlib.contextmanager
    def base_model(self):
        """The frozen copy of the base denoiser inside (``method.frozen_anchor``); without it, the current weights
        (the text encoders are always the current ones: with ``train_text_encoder`` they are trained)."""
        if self._anchor is None:
            yield
            return
        live = self.backbone.denoiser
        device = next(live.parameters()).device
        if next(self._anchor.parameters()).device != device:  # taken at setup, before the model moved
            self._anchor.to(device)
        self.backbone.denoiser = self._anchor
        try:
            yield
        finally:
            self.backbone.denoiser = live

    def trainable_modules(self):
        return [self.backbone.denoiser, *(self.backbone.text_encoders if self.trains_text else [])]

    def write_weights(self, output_dir: Path) -> list[Path]:
        output_dir = Path(output_dir)
        self.backbone.pipeline().save_pretrained(str(output_dir), safe_serialization=True)
        return [output_dir / "model_index.json"]

    def loading_code(self, run: str, base: str) -> str:
        cls = self.backbone.pipeline_class.__name__
        return f"from diffusers import {cls}\n\npipe = {cls}.from_pretrained({run!r})  # fine-tuned from {base}\n"

    def readme_notes(self) -> list[str]:
        return ["- `model_index.json` and the component folders: the whole fine-tuned pipeline (`from_pretrained`); "
                "`checkpoints/`, `logs/`, `config.yaml` beside them are ignored by diffusers"]

    @staticmethod
    def load_into(pipeline, output_dir: Path) -> None:
        """Replace the base pipeline's trained components by the ones saved in ``output_dir`` (usually
        simpler: ``PipelineClass.from_pretrained(OUT)``, which :func:`accord.inference.load_trained` does)."""
        output_dir = Path(output_dir)
        for name in ("unet", "text_encoder", "text_encoder_2"):
            current = getattr(pipeline, name, None)
            if current is not None and (output_dir / name).is_dir():
                loaded = type(current).from_pretrained(str(output_dir), subfolder=name, torch_dtype=current.dtype)
                setattr(pipeline, name, loaded.to(current.device))
