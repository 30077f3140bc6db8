"""Config: YAML + --set share one typed schema; docs/config.md and --help list every key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from accord.cli import build_parser
from accord.config import (
    Config,
    ConfigError,
    MethodOptions,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe_keys,
    load_config,
)
from accord.methods.base import METHOD_REGISTRY, Method, get_method, method_names, method_options, register

ROOT = Path(__file__).resolve().parents[1]


def _all_keys():
    """Every key, the method keys of every registered method included."""
    sections = [(section.name, section.default_factory()) for section in dataclasses.fields(Config)]
    sections += [("method", options) for options in method_options().values()]
    return sorted({f"{name}.{f.name}" for name, cls in sections for f in dataclasses.fields(cls)})


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


BASE = {"model": {"pretrained": "x"}, "data": {"instance_dir": "d", "class_noun": "dog"}}
#: the smallest valid method section of each built-in method
VALID = {"lora": {}, "dreambooth": {}, "textual_inversion": {"placeholder_token": "sks"},
         "custom_diffusion": {"modifier_token": "sks"}, "visual_encoder": {"image_encoder": "enc"},
         "ip_adapter": {"image_encoder": "enc"}, "break_a_scene": {}}


def test_each_method_registers_documented_options():
    """The registry is the list of methods: each has its own options dataclass, every key with help text and listed
    under its method by describe_keys (so in --help and docs/config.md); method.name's choices are the registry."""
    assert list(method_options()) == method_names() == list(VALID) and set(METHOD_REGISTRY) == set(VALID)
    text = describe_keys()
    assert f"[{' | '.join(method_names())}]" in text
    for name, options in method_options().items():
        assert get_method(name).options is options and issubclass(options, MethodOptions)
        assert options().name == name
        block = text.split(f"method (name: {name}):\n", 1)[1].split("\nmethod (name:", 1)[0].split("\naccord:")[0]
        own = [f for f in dataclasses.fields(options) if f.name != "name"]
        for f in own:
            assert f.metadata.get("help"), f"method.{f.name} ({name}) has no help text"
            assert f"\n  {f.name}: " in "\n" + block, f"method.{f.name} is not listed under {name}"
        keys = [line.split(":")[0].strip() for line in block.splitlines() if not line.startswith("    ")]
        assert keys == [f.name for f in own]  # no other method's key under it


@pytest.mark.parametrize("name", list(VALID))
def test_resolved_config_round_trips(name):
    """The resolved config saved beside checkpoints and outputs reads back as the same config (resume compares them),
    with only the chosen method's keys."""
    import yaml

    config = config_from_dict({**BASE, "method": {"name": name, **VALID[name]},
                               "data": {**BASE["data"], "trigger": "sks"}}).validate()
    saved = yaml.safe_dump(config_to_dict(config))
    again = config_from_dict(yaml.safe_load(saved)).validate()
    assert again == config and config_to_dict(again) == config_to_dict(config)
    assert type(again.method) is get_method(name).options
    assert set(config_to_dict(config)["method"]) == {f.name for f in dataclasses.fields(get_method(name).options)}


def test_key_of_another_method_is_one_line():
    with pytest.raises(ConfigError) as info:
        config_from_dict({**BASE, "method": {"name": "textual_inversion", "lora_rank": 8}})
    assert str(info.value) == ("method.lora_rank is for lora / break_a_scene, not textual_inversion; remove it or "
                               "set method.name=lora")
    with pytest.raises(ConfigError, match=r"method\.placeholder_token is for textual_inversion, not lora; remove it "
                                          r"or set method\.name=textual_inversion"):
        config_from_dict({**BASE, "method": {"placeholder_token": "<x>"}})  # no name: lora
    with pytest.raises(ConfigError, match=r"method\.ip_dataset is for ip_adapter, not lora;"):
        load_config(None, ["model.pretrained=x", "data.instance_dir=d", "data.class_noun=dog", "method.ip_dataset=a/b"])
    with pytest.raises(ConfigError) as info:  # a key of no method: the unknown-key line with this method's keys
        config_from_dict({**BASE, "method": {"name": "dreambooth", "lora_rnak": 8}})
    assert str(info.value) == ("unknown config key 'method.lora_rnak'; allowed here: name, train_text_encoder, "
                               "frozen_anchor")


def test_flat_configs_of_older_versions_still_load():
    """Before the per-method options every resolved config held all methods' keys at their defaults; those read
    back (a foreign key at its default changes nothing), and resume reads an old checkpoint's set ones too."""
    old = {"name": "textual_inversion", "placeholder_token": "sks"}
    for options in method_options().values():
        for f in dataclasses.fields(options):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            old.setdefault(f.name, default)
    config = config_from_dict({**BASE, "method": old}).validate()
    assert config.method.placeholder_token == "sks" and not hasattr(config.method, "lora_rank")
    with pytest.raises(ConfigError, match="lora_rank is for lora"):
        config_from_dict({**BASE, "method": {**old, "lora_rank": 4}})
    resumed = config_from_dict({**BASE, "method": {**old, "lora_rank": 4}}, other_methods="drop")
    assert resumed.method == config.method


@pytest.mark.parametrize("method, values, data, message", [
    ("textual_inversion", {}, {}, "textual inversion learns the trigger"),
    ("custom_diffusion", {}, {}, "custom diffusion learns the modifier token"),
    ("visual_encoder", {}, {}, "method.image_encoder is empty: visual_encoder needs"),
    ("visual_encoder", {"image_encoder": "e"}, {"with_prior_preservation": True}, "visual_encoder has no image cond"),
    ("ip_adapter", {"image_encoder": "e", "both_dropout": 1.5}, {}, "method.both_dropout=1.5 is not a probability"),
    ("ip_adapter", {"image_encoder": "e"}, {"instance_dirs": [{"path": "x"}]}, "data.instance_dirs is not for ip_"),
    ("ip_adapter", {"image_encoder": "e"}, {"masked_loss": True},
     "data.masked_loss is for lora, dreambooth, textual_inversion, custom_diffusion, visual_encoder; ip_adapter "
     "trains on an image-caption set without masks"),
    ("break_a_scene", {"bas_phase1_lr": 0}, {}, "method.bas_phase1_lr > 0"),
    ("break_a_scene", {}, {"caption_dropout": 0.1}, "data.caption_dropout, data.shuffle_phrases and data.instance_dirs "
     "are not for break_a_scene"),
    ("custom_diffusion", {"modifier_token": "sks"}, {"instance_dirs": [{"path": "x", "trigger": "zwx"}]},
     "a folder's own trigger/class_noun is for lora or dreambooth; custom_diffusion learns the single"),
])
def test_each_method_checks_its_own_options(method, values, data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({**BASE, "data": {**BASE["data"], **data}, "method": {"name": method, **values}}).validate()


def test_a_registered_method_is_a_config_choice():
    """A plug-in method registered with its options is accepted by the config and listed in --help's keys."""

    @dataclasses.dataclass
    class EchoOptions(MethodOptions):
        echo_depth: int = dataclasses.field(default=2, metadata={"help": "how deep"})

    class Echo(Method):
        name = "echo_test"
        options = EchoOptions

    register(Echo)
    try:
        config = config_from_dict({**BASE, "method": {"name": "echo_test", "echo_depth": 3}}).validate()
        assert config.method.echo_depth == 3 and config.method.name == "echo_test"
        assert "method (name: echo_test):\n  echo_depth: 2\n      how deep" in describe_keys()
        with pytest.raises(ConfigError, match="echo_depth is for echo_test, not lora;"):
            config_from_dict({**BASE, "method": {"echo_depth": 3}})
    finally:
        del METHOD_REGISTRY["echo_test"]
    with pytest.raises(ConfigError, match="method.name='echo_test' is not allowed; choose one of 'lora', "):
        config_from_dict({**BASE, "method": {"name": "echo_test"}})


def test_method_order_does_not_depend_on_which_module_was_imported_first():
    """The registry lists the built-in methods in one order (config choices, docs/config.md, help), even when a
    caller imported one method's module before the others registered."""
    import subprocess
    import sys

    code = ("import accord.methods.textual_inversion\n"
            "from accord.methods.base import METHOD_MODULES, method_names, method_options\n"
            "assert method_names()[:len(METHOD_MODULES)] == list(METHOD_MODULES), method_names()\n"
            "assert list(method_options()) == method_names()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
