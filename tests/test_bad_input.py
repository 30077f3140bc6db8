"""Issue 21: every bad input is one line on stderr naming the file or key, with a non-zero exit code and no
traceback; no fault (a full disk, a damaged checkpoint, changed photos, non-finite losses) loses work."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from trainkit import make_refs, photo, tiny_config

from accord.checkpoint import list_checkpoints
from accord.cli import main
from accord.config import config_to_dict

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TRAIN = {"max_steps": 2, "checkpoint_every": 1, "checkpoints_total_limit": None}
TINY_GENERATE = ["--prompt", "a sks backpack", "--num-images", "1", "--steps", "1", "--height", "32", "--width", "32"]


@pytest.fixture(scope="module")
def trained(model, refs, tmp_path_factory):
    """A finished two-step run with checkpoints at steps 1 and 2."""
    from accord.train import train

    return train(tiny_config(model, refs, tmp_path_factory.mktemp("trained") / "run", train=TRAIN), progress=False)


@dataclass
class Ctx:
    model: Path
    refs: Path
    tmp: Path
    trained: Path | None = None

    def config(self, out: Path | None = None, refs: Path | None = None, **sections) -> Path:
        sections["train"] = {**TRAIN, **sections.get("train", {})}
        config = tiny_config(self.model, refs or self.refs, out or self.tmp / "run", **sections)
        path = self.tmp / "c.yaml"
        path.write_text(yaml.safe_dump(config_to_dict(config)))
        return path

    def copy_run(self) -> Path:
        return Path(shutil.copytree(self.trained, self.tmp / "run"))

    def read_only_folder(self) -> Path:
        folder = self.tmp / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder

    def a_file(self) -> Path:
        path = self.tmp / "a-file"
        path.write_text("not a folder\n")
        return path


@dataclass
class Case:
    """``setup(ctx)`` → the ``accord`` arguments; ``expect``: what the one error line names; ``check(ctx)``: the
    fault kept the work. ``subprocess`` for what needs a process of its own (a file-size limit, no root override)."""

    setup: object
    expect: tuple[str, ...]
    check: object = None
    subprocess: bool = False
    read_only: bool = False
    file_limit: object = None  # ctx -> RLIMIT_FSIZE in bytes


def _set(override: str, *expect: str) -> Case:
    return Case(lambda c: ["train", c.config(), "--set", override], (override.split("=")[0], *expect))


def _damaged_newest(damage):
    def setup(c: Ctx):
        run = c.copy_run()
        damage(run / "checkpoints" / "step-000002")
        return ["train", c.config(run), "--resume", run / "checkpoints" / "step-000002", "--no-progress"]

    return setup


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5])


def _all_damaged(c: Ctx):
    run = c.copy_run()
    for step in list_checkpoints(run):
        (step / "state.json").write_text("{not json")
    return ["train", c.config(run), "--resume", "latest", "--no-progress"]


def _disk_limit(c: Ctx):
    run = c.copy_run()
    shutil.rmtree(run / "checkpoints" / "step-000002")
    return ["train", c.config(run), "--resume", "latest", "--no-progress"]


def _disk_limit_kept_the_last_checkpoint(c: Ctx):
    root = c.tmp / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"], "the partial temporary folder must go"
    again = _accord(["train", c.tmp / "c.yaml", "--resume", "latest", "--no-progress"], subprocess_=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr and "step-000001 at step 1" in again.stderr


def _largest_checkpoint_file(c: Ctx) -> int:
    """A file-size limit below this lets the small files through and stops the checkpoint's largest."""
    return max(f.stat().st_size for f in (c.trained / "checkpoints" / "step-000001").iterdir())


def _changed_references(c: Ctx):
    from accord.train import train

    refs = make_refs(c.tmp / "refs")
    out = train(tiny_config(c.model, refs, c.tmp / "run", train={**TRAIN, "max_steps": 1}), progress=False)
    shutil.copy(photo("backpack", 4), refs / "01.jpg")
    return ["train", c.config(out, refs), "--resume", "latest", "--no-progress"]


def _write_bad_utf8(c: Ctx):
    path = c.tmp / "latin1.yaml"
    path.write_bytes("model: {pretrained: caf\xe9}\n".encode("latin-1"))
    return ["train", path]


CASES = {
    # config values refused at the edge
    "log_every-0": _set("train.log_every=0"),
    "learning_rate-nan": _set("train.learning_rate=.nan", "positive finite"),
    "learning_rate-negative": _set("train.learning_rate=-1e-4", "positive finite"),
    "learning_rate-inf": _set("train.learning_rate=.inf", "positive finite"),
    "weight_decay-negative": _set("train.weight_decay=-0.01", ">= 0"),
    "adam_beta1-one": _set("train.adam_beta1=1.0", "[0, 1)"),
    "adam_beta2-negative": _set("train.adam_beta2=-0.5", "[0, 1)"),
    "seed-beyond-2^63": _set(f"train.seed={2**63}", "out of range"),
    "checkpoint_every-negative": _set("train.checkpoint_every=-1", "negative"),
    "checkpoints_total_limit-0": _set("train.checkpoints_total_limit=0", "at least 1"),
    "checkpoints_total_limit-negative": _set("train.checkpoints_total_limit=-2", "at least 1"),
    "lr_warmup_steps-negative": _set("train.lr_warmup_steps=-5", "negative"),
    "max_grad_norm-negative": _set("train.max_grad_norm=-1", ">= 0"),
    "adam_epsilon-negative": _set("train.adam_epsilon=-1e-8", ">= 0"),
    "set-unparsable-yaml": _set("train.validation_prompts=[a {trigger}]", "not valid YAML", "quote"),
    "config-not-utf8": Case(_write_bad_utf8, ("latin1.yaml", "UTF-8")),
    # output folders
    "train-output-read-only": Case(lambda c: ["train", c.config(c.read_only_folder()), "--no-progress"],
                                   ("train.output_dir", "not writable"), subprocess=True, read_only=True),
    "train-output-under-a-file": Case(lambda c: ["train", c.config(c.a_file() / "run"), "--no-progress"],
                                      ("train.output_dir", "a-file is a file")),
    "generate-output-read-only": Case(lambda c: ["generate", c.trained, *TINY_GENERATE, "--output",
                                                 c.read_only_folder()], ("--output", "not writable"), subprocess=True,
                                      read_only=True),
    "generate-output-under-a-file": Case(lambda c: ["generate", c.trained, *TINY_GENERATE, "--output",
                                                    c.a_file() / "out"], ("--output", "a-file is a file")),
    "generate-num-images-0": Case(lambda c: ["generate", c.trained, *TINY_GENERATE, "--num-images", "0", "--output",
                                             c.tmp / "o"], ("--num-images 0",)),
    "generate-steps-0": Case(lambda c: ["generate", c.trained, *TINY_GENERATE, "--steps", "0", "--output", c.tmp / "o"],
                             ("--steps 0",)),
    "generate-seed-overflow": Case(lambda c: ["generate", c.trained, *TINY_GENERATE, "--seed", str(2**63), "--output",
                                              c.tmp / "o"], ("--seed", "use an integer from 0")),
    "tiny-output-under-a-file": Case(lambda c: ["tiny", "sd", c.a_file() / "model"], ("a-file",)),  # any OSError
    # damaged checkpoints
    "resume-state-json-not-json": Case(_damaged_newest(lambda s: (s / "state.json").write_text("{\"step\": 2,")),
                                       ("step-000002/state.json", "--resume", "step-000001")),
    "resume-optimizer-missing": Case(_damaged_newest(lambda s: (s / "optimizer.safetensors").unlink()),
                                     ("step-000002/optimizer.safetensors is missing", "step-000001")),
    "resume-truncated-safetensors": Case(_damaged_newest(lambda s: _truncate(s / "trainable.safetensors")),
                                         ("step-000002/trainable.safetensors is damaged", "step-000001")),
    "resume-latest-all-damaged": Case(_all_damaged, ("step-000002/state.json", "no earlier checkpoint")),
    # faults while training
    "checkpoint-write-file-size-limit": Case(_disk_limit, ("step-000002 not written", "ulimit -f", "step-000001"),
                                             check=_disk_limit_kept_the_last_checkpoint, subprocess=True,
                                             file_limit=lambda c: _largest_checkpoint_file(c) - 1),
    "resume-references-changed": Case(_changed_references, ("01.jpg: content changed", "--resume-anyway")),
}
SLOW = {"train-output-read-only", "generate-output-read-only", "checkpoint-write-file-size-limit"}


def _accord(args, *, subprocess_=False, read_only=False, file_limit=None, capsys=None):
    """Run ``accord ARGS``: in this process (cli.main, the same code path) or, when asked, in a process of its own."""
    args = [str(a) for a in args]
    if not subprocess_:
        capsys.readouterr()
        code = main(args)
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)
    prefix = []
    if read_only and os.geteuid() == 0:  # root writes anywhere unless it gives up CAP_DAC_OVERRIDE
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a read-only folder cannot be simulated")
        prefix = ["setpriv", "--bounding-set=-dac_override"]

    def limit():
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([*prefix, sys.executable, "-m", "accord.cli", *args], env=ENV, capture_output=True,
                          text=True, timeout=400, preexec_fn=limit)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_bad_input_is_one_line(name, model, refs, trained, tmp_path, capsys):
    case = CASES[name]
    ctx = Ctx(model, refs, tmp_path, trained)
    args = case.setup(ctx)
    limit = case.file_limit(ctx) if case.file_limit else None
    run = _accord(args, subprocess_=case.subprocess, read_only=case.read_only, file_limit=limit, capsys=capsys)
    assert run.returncode != 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith(f"accord {args[0]}:")]
    assert len(errors) == 1, run.stderr[-3000:]
    for text in case.expect:
        assert text in errors[0], errors[0]
    if case.check is not None:
        case.check(ctx)


def test_debug_shows_the_traceback(model, refs, tmp_path):
    config = Ctx(model, refs, tmp_path).config()
    run = _accord(["--debug", "train", config, "--set", "train.log_every=0"], subprocess_=True)
    assert run.returncode != 0 and "Traceback" in run.stderr and "ConfigError: train.log_every=0" in run.stderr


def test_disk_full_keeps_the_last_checkpoint(model, refs, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of the second checkpoint: one line naming the kept one and the space needed."""
    from safetensors import SafetensorError

    from accord import checkpoint

    calls = []
    real = checkpoint.save_file

    def full_disk(tensors, path):
        calls.append(path)
        if len(calls) <= 2:  # trainable + optimizer of step 1
            return real(tensors, path)
        Path(path).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves it
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    run = _accord(["train", Ctx(model, refs, tmp_path).config(), "--no-progress"], capsys=capsys)
    line = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "step-000002 not written (No space left on device)" in line and "MiB free" in line, line
    assert "last good checkpoint" in line and "step-000001" in line, line
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-000001"]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000001"]
    assert json.loads((root / "step-000001" / "state.json").read_text())["step"] == 1


def test_resume_latest_passes_over_a_damaged_newest_checkpoint(model, refs, trained, tmp_path, caplog):
    from accord.train import train

    ctx = Ctx(model, refs, tmp_path, trained)
    run = ctx.copy_run()
    _truncate(run / "checkpoints" / "step-000002" / "optimizer.safetensors")
    with caplog.at_level("INFO", logger="accord"):  # the lab's quiet() may have set it to WARNING
        train(tiny_config(model, refs, run, train=TRAIN), resume="latest", progress=False)
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "damaged" in r.getMessage())
    assert "step-000002/optimizer.safetensors is damaged" in warning and "step-000001" in warning
    assert any("step-000001 at step 1" in r.getMessage() for r in caplog.records)
    assert json.loads((run / "checkpoints" / "step-000002" / "state.json").read_text())["step"] == 2  # rewritten


def test_resume_reads_a_checkpoint_config_with_every_methods_keys(model, refs, trained, tmp_path, caplog):
    """Checkpoints written before the method options were split per method saved every method's key (a set one
    too, which the run ignored); resuming one compares only the run's method's keys."""
    import dataclasses

    from accord.methods.base import method_options
    from accord.train import train

    run = Ctx(model, refs, tmp_path, trained).copy_run()
    saved = run / "checkpoints" / "step-000001" / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    for options in method_options().values():
        for f in dataclasses.fields(options):
            config["method"].setdefault(f.name, f.default if f.default is not dataclasses.MISSING
                                        else f.default_factory())
    config["method"]["placeholder_token"] = "<old>"  # set in the old flat config, ignored by its lora run
    saved.write_text(yaml.safe_dump(config))
    with caplog.at_level("INFO", logger="accord"):  # the lab's quiet() may have set it to WARNING
        train(tiny_config(model, refs, run, train=TRAIN), resume=str(saved.parent), progress=False)
    assert any("step-000001 at step 1" in r.getMessage() for r in caplog.records)


def test_resume_anyway_continues_on_changed_references(model, tmp_path, caplog):
    from accord.train import train

    refs = make_refs(tmp_path / "refs")
    train(tiny_config(model, refs, tmp_path / "run", train={**TRAIN, "max_steps": 1}), progress=False)
    (refs / "03.jpg").unlink()
    (refs / "03.txt").unlink()
    with caplog.at_level("WARNING"):
        train(tiny_config(model, refs, tmp_path / "run", train=TRAIN), resume="latest", resume_anyway=True,
              progress=False)
    assert any("--resume-anyway" in r.getMessage() and "03.jpg: removed" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "run" / "checkpoints" / "step-000002").is_dir()


def test_nonfinite_final_steps_end_with_the_last_good_weights(model, refs, tmp_path, capsys, monkeypatch):
    from accord import train as train_module

    calls = []

    def poison(module, inputs, output):  # step 1 runs two forwards (DDLoss); every later one is NaN
        calls.append(1)
        return output if len(calls) <= 2 else (output[0] * float("nan"),) + tuple(output[1:])

    original = train_module.load_backbone

    def patched(*args, **kwargs):
        backbone = original(*args, **kwargs)
        backbone.denoiser.register_forward_hook(poison)
        return backbone

    monkeypatch.setattr(train_module, "load_backbone", patched)
    out = tmp_path / "run"
    run = _accord(["train", Ctx(model, refs, tmp_path).config(out, train={"max_steps": 3}), "--no-progress"],
                  capsys=capsys)
    line = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "last 2 step(s) had non-finite losses" in line and "step 1" in line, run.stderr
    final = load_file(str(out / "pytorch_lora_weights.safetensors"))
    kept = load_file(str(out / "checkpoints" / "step-000001" / "pytorch_lora_weights.safetensors"))
    assert final.keys() == kept.keys() and all((final[k] == kept[k]).all() for k in final)
    assert json.loads((out / "train_summary.json").read_text())["skipped_final_steps"] == 2


def test_class_noun_in_no_caption_warns(refs):
    from accord.data.references import scan_references

    with pytest.warns(UserWarning, match=r"data.class_noun='dog' is in none of the 4 captions"):
        scan_references(refs, "sks", "dog")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_references(refs, "sks", "backpack")


def test_multiword_initializer_names_the_word_used(model):
    from accord.backbones import load_backbone
    from accord.config import ModelConfig

    backbone = load_backbone(ModelConfig(pretrained=str(model)))
    used = r"'stuffed animal'.*first only, 'stuffed'.*method.initializer_token.*'animal'"
    with pytest.warns(UserWarning, match=used):
        backbone.add_tokens(["<s*>"], "stuffed animal")
