"""Several reference folders in one run (``data.instance_dirs``) and the caption options of the dataset.

Each entry of ``data.instance_dirs`` is a mapping (as kohya's dataset config subsets, SimpleTuner's
datasets and ai-toolkit's folders)::

    data:
      instance_dirs:
        - {path: refs/backpack, repeats: 2}
        - {path: refs/dog, trigger: zwx, class_noun: dog, weight: 0.5}

``repeats`` (default 1) lists each of the folder's images that many times per epoch (each copy gets its own
crop, flip and caption draw); ``weight`` (default 1) multiplies the diffusion loss of its samples;
``trigger`` / ``class_noun`` default to ``data.trigger`` / ``data.class_noun`` and split that folder's
captions into ``c_p`` and ``c_g``. ``data.instance_dir``, when also set, is one more folder with the
defaults.
"""

from __future__ import annotations

import logging
import math

from ..errors import ConfigError

__all__ = ["INSTANCE_DIR_KEYS", "parse_instance_dirs", "scan_instance_dirs", "caption_options", "check_data_config"]

logger = logging.getLogger("accord.data")

INSTANCE_DIR_KEYS = ("path", "repeats", "weight", "trigger", "class_noun")


def parse_instance_dirs(value) -> list[dict]:
    """``data.instance_dirs`` from YAML / ``--set``: a list of mappings with :data:`INSTANCE_DIR_KEYS`."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"data.instance_dirs={value!r} must be a list of folders, "
                          "e.g. [{path: refs/a, repeats: 2}]")
    out = []
    for i, entry in enumerate(value):
        where = f"data.instance_dirs[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}={entry!r} must be a folder path or a mapping with "
                              f"{', '.join(INSTANCE_DIR_KEYS)}")
        unknown = sorted(set(entry) - set(INSTANCE_DIR_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(INSTANCE_DIR_KEYS)}")
        path = entry.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{where}.path is missing: give the folder of reference images")
        repeats = entry.get("repeats", 1)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ConfigError(f"{where}.repeats={repeats!r} must be a whole number >= 1 (times per epoch)")
        weight = entry.get("weight", 1.0)
        if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                or not (math.isfinite(weight) and weight > 0)):
            raise ConfigError(f"{where}.weight={weight!r} must be a positive number (its samples' loss weight)")
        parsed = {"path": path, "repeats": repeats, "weight": float(weight)}
        for key in ("trigger", "class_noun"):
            if entry.get(key) is not None:
                if not isinstance(entry[key], str) or not entry[key].strip():
                    raise ConfigError(f"{where}.{key}={entry[key]!r} must be a non-empty word, "
                                      f"or left out for data.{key}")
                parsed[key] = entry[key]
        out.append(parsed)
    return out


def _folders(d) -> list[dict]:
    base = [{"path": d.instance_dir, "repeats": 1, "weight": 1.0}] if d.instance_dir else []
    return base + [dict(f) for f in d.instance_dirs]


def check_data_config(config) -> None:
    """Combinations the loop cannot honour (called by ``Config.validate``)."""
    d = config.data
    if not 0 <= d.caption_dropout < 1:
        raise ConfigError(f"data.caption_dropout={d.caption_dropout} is not a probability below 1; use 0..1, e.g. 0.1")
    if d.keep_phrases < 0:
        raise ConfigError(f"data.keep_phrases={d.keep_phrases} is negative; "
                          "use 0 or the number of phrases kept in place")
    own = [f for f in d.instance_dirs if f.get("trigger", d.trigger) != d.trigger
           or f.get("class_noun", d.class_noun) != d.class_noun]
    if own:
        if not config.method.folder_triggers:
            from ..methods.base import methods_with

            names = " or ".join(methods_with("folder_triggers"))
            raise ConfigError(f"data.instance_dirs: a folder's own trigger/class_noun is for {names}; "
                              f"{config.method.name} learns the single data.trigger token, leave them out")
        uses = [k for k, v in (("accord.pd_weight", config.accord.pd_weight),
                               ("regularizers.sude_weight", config.regularizers.sude_weight),
                               ("regularizers.classdiffusion_weight", config.regularizers.classdiffusion_weight),
                               ("data.with_prior_preservation", d.with_prior_preservation)) if v]
        if uses:
            raise ConfigError(f"data.instance_dirs: {uses[0]} uses the single data.trigger/data.class_noun, but "
                              f"{own[0]['path']} has its own; set {uses[0]} off or give every folder the same ones")


def scan_instance_dirs(d) -> list:
    """The reference items of every folder (``data.instance_dir`` and ``data.instance_dirs``), each repeated
    ``repeats`` times and carrying its folder's ``weight``."""
    from dataclasses import replace

    from .references import scan_references

    items = []
    for f in _folders(d):
        # data.mask_dir holds the masks of data.instance_dir's images (same names)
        mask_dir = d.mask_dir if d.masked_loss and str(f["path"]) == str(d.instance_dir) else None
        found = scan_references(f["path"], f.get("trigger", d.trigger), f.get("class_noun", d.class_noun),
                                on_bad_image=d.on_bad_image, mask_dir=mask_dir)
        if f["weight"] != 1.0:
            found = [replace(it, weight=f["weight"]) for it in found]
        items += found * f["repeats"]
    return items


def caption_options(d) -> dict:
    """``ReferenceDataset``'s caption keyword arguments from the data config (and the note the log needs)."""
    if d.caption_dropout > 0:
        logger.info("data.caption_dropout=%g: about %d%% of samples train on the empty caption; they carry no DD "
                    "term (logged per step as captions_dropped)", d.caption_dropout, round(100 * d.caption_dropout))
    return {"caption_dropout": d.caption_dropout, "shuffle_phrases": d.shuffle_phrases, "keep_phrases": d.keep_phrases}
