"""Load what a training run wrote as a stock diffusers pipeline (``accord generate`` builds on it)."""

from __future__ import annotations

from pathlib import Path

import yaml

from .checkpoint import CONFIG_FILE
from .errors import ModelLoadError

__all__ = ["load_trained"]


def load_trained(output_dir_or_model: str | Path, *, device: str = "cpu", dtype=None):
    """A stock ``DiffusionPipeline`` with a run's result applied.

    ``output_dir_or_model`` is a run's output folder (or one of its ``checkpoints/step-N``): its
    ``config.yaml`` names the base model (``model.pretrained``) and the method, whose ``load_into``
    puts the trained weights into the base pipeline. A folder that is itself a pipeline (DreamBooth
    writes one) and any plain model folder or hub id are loaded as they are.
    """
    from .backbones import _load_pipeline, detect_family
    from .config import config_from_dict
    from .methods import get_method

    path = Path(output_dir_or_model)
    if (path / "model_index.json").is_file():
        pipe = _plain_pipeline(str(path), dtype)
    elif (path / CONFIG_FILE).is_file():
        config = config_from_dict(yaml.safe_load((path / CONFIG_FILE).read_text()))
        model = config.model
        family = model.backbone if model.backbone != "auto" else detect_family(model.pretrained, model.revision)
        import diffusers

        cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
        pipe = _load_pipeline(cls, model, family)
        if model.prediction_type is not None:
            pipe.scheduler.register_to_config(prediction_type=model.prediction_type)
        get_method(config.method.name).load_into(pipe, path)
    elif path.exists():
        raise ModelLoadError(f"{path} is neither a run's output folder (no {CONFIG_FILE}) nor a diffusers folder "
                             "(no model_index.json); point at train.output_dir of a finished run")
    else:
        pipe = _plain_pipeline(str(output_dir_or_model), dtype)
    return pipe.to(device=device, dtype=dtype) if dtype is not None else pipe.to(device)


def _plain_pipeline(source: str, dtype):
    from diffusers import DiffusionPipeline

    from .backbones import _offline_hint

    try:
        return DiffusionPipeline.from_pretrained(source, **({"torch_dtype": dtype} if dtype is not None else {}))
    except (OSError, ValueError, EnvironmentError) as exc:
        if Path(source).exists():
            raise ModelLoadError(f"{source}: could not be loaded as a pipeline ({str(exc).splitlines()[0]})") from None
        raise ModelLoadError(_offline_hint(source)) from None
