"""Resumable checkpoints, written atomically, without pickles.

Layout of ``OUTPUT/checkpoints/step-000100/``: the method's stock-format outputs (so each
checkpoint can be evaluated or loaded like a final result), ``trainable.safetensors`` (the trained
tensors), ``optimizer.safetensors`` + ``optimizer.json`` (state tensors and the rest),
``state.json`` (step, scheduler state), ``config.yaml`` (the resolved config) and, with ``train.ema_decay``,
``ema.safetensors`` (the moving average; the stock-format outputs are then its weights). A checkpoint is
built in a temporary folder and renamed into place, so a kill never leaves half of one; a write that fails
(disk full, file-size limit) removes the temporary folder and names the last good checkpoint. Resuming reads
every file before applying any: ``--resume latest`` passes over a damaged newest checkpoint to the previous
one with a warning, and ``state.json`` keeps a fingerprint of the reference images so a resume on changed
photos is refused unless asked for (``--resume-anyway``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .ema import averaged
from .errors import AccordError, CheckpointError, ConfigError, DataError

__all__ = ["save_checkpoint", "load_checkpoint", "resume_checkpoint", "find_checkpoint", "list_checkpoints",
           "write_config", "CONFIG_FILE"]

logger = logging.getLogger("accord.checkpoint")

CONFIG_FILE = "config.yaml"
EMA_FILE = "ema.safetensors"
_PREFIX = "step-"


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))


def find_checkpoint(output_dir: Path, which: str) -> Path:
    """``which`` is ``latest`` or a checkpoint folder path."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise AccordError(f"--resume latest: no checkpoint in {Path(output_dir) / 'checkpoints'}; "
                              "start without --resume")
        return found[-1]
    path = Path(which)
    if not (path / "state.json").is_file():
        raise AccordError(f"--resume {which}: not a checkpoint folder (no state.json); "
                          "use 'latest' or a checkpoints/step-N folder")
    return path


def write_config(path: Path, config_dict: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_dict, sort_keys=False))
    os.replace(tmp, path)


def _optimizer_to_files(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(output_dir: Path, step: int, *, method, optimizer, lr_scheduler, config_dict: dict, extra: dict,
                    keep: int | None, ema=None) -> Path:
    """Write ``checkpoints/step-N`` atomically and prune to ``keep`` newest. Main process only. With ``ema``
    (:class:`accord.ema.Ema`) its state is kept and the outputs are written from the averaged weights."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f".tmp-{_PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    trainable = method.trainable_state()
    tensors, meta = _optimizer_to_files(optimizer)
    try:
        tmp.mkdir()
        with averaged(ema):
            method.save(tmp)
        save_file(trainable, str(tmp / "trainable.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        state = {"step": step, "lr_scheduler": lr_scheduler.state_dict(), **extra}
        if ema is not None:
            save_file(ema.state_tensors(), str(tmp / EMA_FILE))
            state["ema"] = ema.state()
        (tmp / "state.json").write_text(json.dumps(state))
        write_config(tmp / CONFIG_FILE, config_dict)
    except (OSError, SafetensorError) as exc:  # disk full, a file-size limit, ...: keep the last good checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        total = 3 * _nbytes(trainable) + _nbytes(tensors)  # stock-format outputs + trainable + optimizer
        raise CheckpointError(_not_written(output_dir, final, exc, total, _nbytes(tensors))) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    # safetensors: "I/O error: No space left on device (os error 28)" or 'IoError(Os { ..., message: "..." })'
    found = re.search(r'message: "([^"]+)"|I/O error: (.+?) \(os error \d+\)', str(exc))
    return (found.group(1) or found.group(2)) if found else " ".join(str(exc).split())


def _not_written(output_dir: Path, final: Path, exc: BaseException, total: int, largest: int) -> str:
    found = [p for p in list_checkpoints(output_dir) if _step_of(p) < _step_of(final)]
    if found:  # the previous checkpoint's files are the best estimate of this one's
        sizes = [f.stat().st_size for f in found[-1].iterdir() if f.is_file()]
        total, largest = sum(sizes), max(sizes, default=largest)
    reason = _reason(exc)
    if reason == os.strerror(errno.EFBIG):
        need = f"its largest file is about {largest / 2**20:.1f} MiB: raise the file-size limit (ulimit -f)"
    else:
        free = shutil.disk_usage(final.parent).free
        need = f"it needs about {total / 2**20:.1f} MiB and {final.parent} has {free / 2**20:.1f} MiB free"
    kept = (f"the last good checkpoint, {found[-1]}, is kept: fix that, then --resume latest" if found
            else "no earlier checkpoint exists: fix that and start again")
    return f"checkpoint {final} not written ({reason}); {need}; {kept}"


@dataclass
class _Stored:
    """Every file of one checkpoint, read before any is applied."""

    config: dict
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    optimizer_meta: dict
    state: dict
    ema: dict[str, torch.Tensor] | None = None


def _read(path: Path) -> _Stored:
    """Read a checkpoint; a missing or damaged file raises :class:`CheckpointError` naming it."""
    def damaged(name: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{path / name} {problem}")

    def mapping(name: str, parse, what: str) -> dict:
        try:
            value = parse((path / name).read_text())
        except FileNotFoundError:
            raise damaged(name, "is missing") from None
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
            raise damaged(name, f"is not valid {what}") from None
        if not isinstance(value, dict):
            raise damaged(name, f"is not a {what} mapping")
        return value

    def tensors(name: str) -> dict[str, torch.Tensor]:
        if not (path / name).is_file():
            raise damaged(name, "is missing")
        try:
            return load_file(str(path / name))
        except (OSError, SafetensorError) as exc:
            raise damaged(name, f"is damaged ({_reason(exc)})") from None

    state = mapping("state.json", json.loads, "JSON")
    if not isinstance(state.get("step"), int) or not isinstance(state.get("lr_scheduler"), dict):
        raise damaged("state.json", "lacks the step or the lr_scheduler state")
    meta = mapping("optimizer.json", json.loads, "JSON")
    if not {"param_groups", "scalars"} <= set(meta):
        raise damaged("optimizer.json", "lacks param_groups or scalars")
    ema = tensors(EMA_FILE) if "ema" in state else None
    return _Stored(mapping(CONFIG_FILE, yaml.safe_load, "YAML"), tensors("trainable.safetensors"),
                   tensors("optimizer.safetensors"), meta, state, ema)


def _step_of(path: Path) -> int | None:
    name = Path(path).name
    return int(name[len(_PREFIX):]) if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit() else None


def _previous_intact(output_dir: Path, before: int | None) -> Path | None:
    for path in reversed(list_checkpoints(output_dir)):
        if before is None or _step_of(path) < before:
            try:
                _read(path)
                return path
            except CheckpointError:
                continue
    return None


def _pick(output_dir: Path, which: str) -> tuple[Path, _Stored]:
    """The checkpoint ``--resume`` names, read whole; ``latest`` falls back over damaged ones with a warning."""
    path = find_checkpoint(output_dir, which)
    try:
        return path, _read(path)
    except CheckpointError as exc:
        damage = exc
    previous = _previous_intact(output_dir, _step_of(path))
    if previous is None:
        raise CheckpointError(f"--resume {which}: {damage}, and no earlier checkpoint in "
                              f"{Path(output_dir) / 'checkpoints'} is intact; start a new output_dir")
    if which != "latest":
        raise CheckpointError(f"--resume {which}: {damage}; resume from the previous checkpoint with "
                              f"--resume {previous}")
    logger.warning("the newest checkpoint is damaged (%s); resuming from the previous intact one, %s", damage, previous)
    return previous, _read(previous)


def resume_checkpoint(output_dir: Path, which: str, *, method, optimizer, lr_scheduler, config_dict: dict,
                      references: dict | None = None, resume_anyway: bool = False, ema=None) -> tuple[Path, dict]:
    """Find, check and restore the checkpoint ``--resume`` names; returns its path and ``state.json``."""
    path, stored = _pick(output_dir, which)
    _apply(path, stored, method=method, optimizer=optimizer, lr_scheduler=lr_scheduler, config_dict=config_dict,
           references=references, resume_anyway=resume_anyway, ema=ema)
    return path, stored.state


def load_checkpoint(path: Path, *, method, optimizer, lr_scheduler, config_dict: dict, references: dict | None = None,
                    resume_anyway: bool = False, ema=None) -> dict:
    """Restore trained tensors, optimizer and scheduler (and ``ema``); refuse a checkpoint of a different config or
    references."""
    stored = _read(Path(path))
    _apply(Path(path), stored, method=method, optimizer=optimizer, lr_scheduler=lr_scheduler, config_dict=config_dict,
           references=references, resume_anyway=resume_anyway, ema=ema)
    return stored.state


def _apply(path: Path, stored: _Stored, *, method, optimizer, lr_scheduler, config_dict: dict, references: dict | None,
           resume_anyway: bool, ema=None) -> None:
    from .config import config_from_dict, config_to_dict

    # keys added since the checkpoint read as their defaults; keys of other methods (every method's key was saved
    # before the method options were split per method) are dropped
    saved = config_to_dict(config_from_dict(stored.config, other_methods="drop"))
    differing = _differences(saved, config_dict, ignore={("train", "max_steps"), ("train", "output_dir"),
                                                          ("train", "overwrite_output_dir"), ("train", "ema_on_cpu")})
    if differing:
        shown = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in differing[:4])
        raise ConfigError(f"--resume {path}: the config differs from the checkpoint's ({shown}); "
                          "resume with the same config or start a new output_dir")
    _check_references(path, stored.state.get("references"), references, resume_anyway)
    if ema is not None:  # the same config: its checkpoints were written with the EMA
        if stored.ema is None:
            raise CheckpointError(f"{path / EMA_FILE} is missing (train.ema_decay is on); resume from another "
                                  "checkpoint or start a new output_dir")
        try:
            ema.load(stored.ema, stored.state["ema"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path / EMA_FILE} does not match the trained parameters ({exc}); resume from "
                                  "another checkpoint or start a new output_dir") from None
    method.load_trainable_state(stored.trainable)
    _optimizer_from_files(optimizer, stored.optimizer, stored.optimizer_meta)
    lr_scheduler.load_state_dict(stored.state["lr_scheduler"])


def _check_references(path: Path, saved: dict | None, now: dict | None, resume_anyway: bool) -> None:
    if saved is None or now is None:  # a checkpoint written before fingerprints were kept
        return
    from .data.references import fingerprint_changes

    changes = fingerprint_changes(saved, now)
    if not changes:
        return
    shown = "; ".join(changes[:5]) + (f"; {len(changes) - 5} more" if len(changes) > 5 else "")
    if resume_anyway:
        logger.warning("--resume-anyway: the reference images changed since %s (%s); continuing on the new ones",
                       path, shown)
        return
    raise DataError(f"--resume {path}: the reference images changed since this checkpoint ({shown}); restore them, "
                    "start a new output_dir, or pass --resume-anyway to continue on the new ones")


def _differences(saved: dict, now: dict, ignore: set) -> list[tuple[str, object, object]]:
    out = []
    for section in sorted(set(saved) | set(now)):
        a, b = saved.get(section) or {}, now.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if (section, key) in ignore:
                continue
            if a.get(key) != b.get(key):
                out.append((f"{section}.{key}", a.get(key), b.get(key)))
    return out
