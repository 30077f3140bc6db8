"""Load what a training run wrote as a stock diffusers pipeline (``accord generate`` and ``accord eval``
build on it).

Every trained output goes through its method's ``load_into`` (:mod:`accord.methods`); the method is
``method.name`` of the run's ``config.yaml`` or, where that names none, the one whose output file
(:attr:`accord.methods.base.Method.output_file`) is in the folder. For sweeps over checkpoints the
pieces are separate: :func:`load_base` loads the base model once, :func:`apply_trained` puts one
checkpoint's result into it and :func:`remove_trained` takes it out again (``Method.unload_from``;
``False`` where a method cannot, and the caller reloads the base).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .checkpoint import CONFIG_FILE
from .errors import ConfigError, ModelLoadError

__all__ = ["apply_trained", "is_trained_output", "load_base", "load_trained", "read_run_config", "remove_trained",
           "trained_method"]


def read_run_config(folder: str | Path) -> dict:
    """The resolved training config saved beside a trained output (``config.yaml``); {} when absent."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix or remove it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections")
    return data


def _methods():
    from .methods.base import METHOD_REGISTRY, method_names

    return [METHOD_REGISTRY[name] for name in method_names()]


def is_trained_output(folder: str | Path) -> bool:
    """``folder`` holds a method's output file (a final output or a ``checkpoints/step-N``)."""
    return any(cls.output_file and (Path(folder) / cls.output_file).is_file() for cls in _methods())


def trained_method(folder: str | Path, config: dict | None = None):
    """The method class that wrote ``folder``: ``method.name`` of its ``config.yaml`` (of ``config``, the
    run's, where the folder has none), else the one whose output file is there."""
    from .methods import get_method

    config = read_run_config(folder) or config or {}
    name = (config.get("method") or {}).get("name") if isinstance(config.get("method"), dict) else None
    if name:
        return get_method(str(name))
    found = [cls for cls in _methods() if cls.output_file and (Path(folder) / cls.output_file).is_file()]
    if len(found) != 1:
        files = ", ".join(cls.output_file for cls in _methods() if cls.output_file)
        raise ModelLoadError(f"{folder}: {'no' if not found else 'more than one'} trained output ({files}) and no "
                             f"method.name in {CONFIG_FILE}; point at a trained output or checkpoint folder")
    return found[0]


def load_base(source: str | Path, *, base_model: str | None = None, dtype=None):
    """The base pipeline of a run folder (``model`` of its ``config.yaml``, ``pretrained`` replaced by
    ``base_model`` when given), or the pipeline folder / hub id ``base_model or source`` as it is."""
    from .backbones import _PIPELINES, _load_pipeline, detect_family
    from .config import config_from_dict

    path = Path(source)
    config = read_run_config(path) if path.is_dir() else {}
    if not config.get("model"):
        if base_model is None and path.is_dir() and not (path / "model_index.json").is_file():
            raise ConfigError(f"{path / CONFIG_FILE}: no model.pretrained; "
                              "pass the base model explicitly (--base-model)")
        return _plain_pipeline(str(base_model or source), dtype)
    model = config_from_dict({"model": config["model"]}).model
    if base_model:
        model.pretrained = str(base_model)
    if not model.pretrained:
        raise ConfigError(f"{Path(source) / CONFIG_FILE}: no model.pretrained; pass the base model explicitly")
    family = model.backbone if model.backbone != "auto" else detect_family(model.pretrained, model.revision)
    import diffusers

    cls = getattr(diffusers, _PIPELINES[family])
    pipe = _load_pipeline(cls, model, family)
    if model.prediction_type is not None:
        pipe.scheduler.register_to_config(prediction_type=model.prediction_type)
    return pipe if dtype is None else pipe.to(dtype=dtype)


def apply_trained(pipeline, folder: str | Path, config: dict | None = None):
    """Put the result in ``folder`` into ``pipeline`` (of its base model) with the method's ``load_into``
    (``config``: see :func:`trained_method`); returns the method class (for :func:`remove_trained`)."""
    folder = Path(folder)
    method = trained_method(folder, config)
    try:
        method.load_into(pipeline, folder)
    except (ModelLoadError, ConfigError):
        raise
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"{folder}: cannot load the {method.name} output ({first}); "
                             "was it trained on this base model?") from None
    return method


def remove_trained(pipeline, method) -> bool:
    """Undo :func:`apply_trained`; ``False`` where the method cannot (reload the base pipeline then)."""
    return bool(method.unload_from(pipeline))


def load_trained(output_dir_or_model: str | Path, *, device: str = "cpu", dtype=None, base_model: str | None = None):
    """A stock ``DiffusionPipeline`` with a run's result applied.

    ``output_dir_or_model`` is a run's output folder (or one of its ``checkpoints/step-N``): its
    ``config.yaml`` names the base model (``model.pretrained``, or ``base_model`` when given) and the
    method, whose ``load_into`` puts the trained weights into the base pipeline. A folder that is
    itself a pipeline (DreamBooth writes one) and any plain model folder or hub id are loaded as they are.
    """
    path = Path(output_dir_or_model)
    if (path / "model_index.json").is_file():
        pipe = _plain_pipeline(str(path), dtype)
    elif (path / CONFIG_FILE).is_file() or (base_model and is_trained_output(path)):
        pipe = load_base(path, base_model=base_model)
        apply_trained(pipe, path)
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
    except (OSError, ValueError) as exc:
        if Path(source).exists():
            raise ModelLoadError(f"{source}: could not be loaded as a pipeline ({str(exc).splitlines()[0]})") from None
        raise ModelLoadError(_offline_hint(source)) from None
