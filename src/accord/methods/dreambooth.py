"""DreamBooth (Ruiz et al., 2023): fine-tune the whole UNet (and optionally the text encoders).

The class-prior loss is on with ``data.with_prior_preservation`` (the loop adds the class batches).
Output: the full pipeline, ``save_pretrained`` with safetensors, at the top of the output folder, so
``StableDiffusionPipeline.from_pretrained(OUT)`` (or ``StableDiffusionXLPipeline``) loads it; the
``checkpoints/``, ``logs/`` and ``config.yaml`` beside it are ignored by diffusers. Components the run
did not train are written as they were held in training (in the ``train.mixed_precision`` dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import Method, TextEncoderOptions, register


@dataclass
class DreamBoothOptions(TextEncoderOptions):
    supports_masked_loss = True
    folder_triggers = True


@register
class DreamBooth(Method):
    name = "dreambooth"
    options = DreamBoothOptions
    output_file = "model_index.json"

    def setup(self) -> None:
        super().setup()
        self.trains_text = bool(self.config.method.train_text_encoder)
        for module in self.trainable_modules():
            module.requires_grad_(True)

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
