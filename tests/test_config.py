"""Config: YAML + --set share one typed schema; docs/config.md and --help list every key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from accord.cli import build_parser
from accord.config import Config, ConfigError, apply_overrides, config_from_dict, describe_keys, load_config

ROOT = Path(__file__).resolve().parents[1]


def _all_keys():
    return [f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
            for f in dataclasses.fields(section.default_factory())]


def test_docs_and_help_list_every_key():
    doc = (ROOT / "docs" / "config.md").read_text()
    assert describe_keys() in doc, "docs/config.md is stale: regenerate it from accord.config.describe_keys()"
    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    help_text = sub.format_help()
    for key in _all_keys():
        section, name = key.split(".")
        assert f"  {name}:" in help_text and f"{section}:" in help_text, key


def test_overrides_parse_yaml_values(tmp_path):
    data = apply_overrides({"model": {"pretrained": "x"}}, ["accord.dd_weight=0.25", "train.validation_prompts=[a, b]",
                                                            "model.variant=null", "data.random_flip=true"])
    cfg = config_from_dict({**data, "data": {**data["data"], "instance_dir": "d", "class_noun": "dog"}}).validate()
    assert cfg.accord.dd_weight == 0.25 and cfg.train.validation_prompts == ["a", "b"]
    assert cfg.model.variant is None and cfg.data.random_flip is True


def test_env_variables_are_substituted_or_fail_loudly(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("model: {pretrained: \"${MODEL_ROOT}/sd\"}\ndata: {instance_dir: d, class_noun: dog}\n")
    monkeypatch.setenv("MODEL_ROOT", "/models")
    assert load_config(path).model.pretrained == "/models/sd"
    monkeypatch.delenv("MODEL_ROOT")
    with pytest.raises(ConfigError, match="MODEL_ROOT"):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("model: [1, 2]", "section 'model' must be a mapping"),
    ("modle: {}", "unknown config key 'modle' (did you mean 'model'?)"),
    ("model: {pretrained: x\n", "line"),
])
def test_bad_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        load_config(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_method_token_must_match_trigger():
    with pytest.raises(ConfigError, match="textual inversion learns the trigger"):
        config_from_dict({"model": {"pretrained": "x"}, "data": {"instance_dir": "d", "class_noun": "dog"},
                          "method": {"name": "textual_inversion"}}).validate()


@pytest.mark.parametrize("raw, fix", [
    ({"accord": {"dd_reduction": "mean"}}, "accord.dd_scale"),
    ({"accord": {"dd_personal_grad": False}}, "dd_variant=frozen_personal"),
    ({"regularizers": {"sude_truncation": 0.5}}, "sude_truncation=fixed and regularizers.sude_tau=0.5"),
])
def test_replaced_keys_name_their_successor(raw, fix):
    with pytest.raises(ConfigError, match=fix.replace(".", r"\.")) as info:
        config_from_dict({"model": {"pretrained": "x"}, **raw})
    assert "\n" not in str(info.value)


def test_default_scale_is_the_papers_reference():
    assert Config().accord.dd_scale == "reference" and Config().regularizers.sude_truncation == "category"
