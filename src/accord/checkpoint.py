"""Resumable checkpoints, written atomically, without pickles.

Layout of ``OUTPUT/checkpoints/step-000100/``: the method's stock-format outputs (so each
checkpoint can be evaluated or loaded like a final result), ``trainable.safetensors`` (the trained
tensors), ``optimizer.safetensors`` + ``optimizer.json`` (state tensors and the rest),
``state.json`` (step, scheduler state) and ``config.yaml`` (the resolved config). A checkpoint is
built in a temporary folder and renamed into place, so a kill never leaves half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .errors import AccordError, ConfigError

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "list_checkpoints", "write_config", "CONFIG_FILE"]

CONFIG_FILE = "config.yaml"
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
            raise AccordError(f"--resume latest: no checkpoint in {Path(output_dir) / 'checkpoints'}; start without --resume")
        return found[-1]
    path = Path(which)
    if not (path / "state.json").is_file():
        raise AccordError(f"--resume {which}: not a checkpoint folder (no state.json); use 'latest' or a checkpoints/step-N folder")
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
                    keep: int | None) -> Path:
    """Write ``checkpoints/step-N`` atomically and prune to ``keep`` newest. Main process only."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f".tmp-{_PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    method.save(tmp)
    save_file(method.trainable_state(), str(tmp / "trainable.safetensors"))
    tensors, meta = _optimizer_to_files(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    state = {"step": step, "lr_scheduler": lr_scheduler.state_dict(), **extra}
    (tmp / "state.json").write_text(json.dumps(state))
    write_config(tmp / CONFIG_FILE, config_dict)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, *, method, optimizer, lr_scheduler, config_dict: dict) -> dict:
    """Restore trained tensors, optimizer and scheduler; refuse a checkpoint of a different config."""
    saved = yaml.safe_load((path / CONFIG_FILE).read_text())
    from .config import config_from_dict, config_to_dict

    saved = config_to_dict(config_from_dict(saved))  # keys added since the checkpoint read as their defaults
    differing = _differences(saved, config_dict, ignore={("train", "max_steps"), ("train", "output_dir"),
                                                          ("train", "overwrite_output_dir")})
    if differing:
        shown = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in differing[:4])
        raise ConfigError(f"--resume {path}: the config differs from the checkpoint's ({shown}); "
                          "resume with the same config or start a new output_dir")
    method.load_trainable_state(load_file(str(path / "trainable.safetensors")))
    _optimizer_from_files(optimizer, load_file(str(path / "optimizer.safetensors")),
                          json.loads((path / "optimizer.json").read_text()))
    state = json.loads((path / "state.json").read_text())
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return state


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
