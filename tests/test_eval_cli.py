"""`accord eval` end to end on a tiny pipeline, DreamBench parsing and categories, best-step selection."""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter

import pytest
import torch
import yaml

from accord.commands import eval as eval_cli
from accord.errors import ConfigError, DataError
from accord.eval.benchmarks import (
    CATEGORIES,
    DREAMBENCH_CATEGORIES,
    LIVE_CLASSES,
    dreambench_prompts,
    folder_prompts,
    parse_dreambench,
    stylebench_prompts,
)
from accord.eval.best_step import parse_criterion
from accord.eval.tiny import save_tiny_metric_models


@pytest.fixture(scope="module")
def metric_dirs(tmp_path_factory):
    return save_tiny_metric_models(tmp_path_factory.mktemp("metric_models"))


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    return eval_cli.run(parser.parse_args(argv))


def _model_flags(d) -> list[str]:
    return ["--clip-model", str(d["clip"]), "--dino-model", str(d["dino"]), "--blip-model", str(d["blip"]),
            "--vgg-weights", str(d["vgg"]), "--no-progress", "--device", "cpu"]


FAST = ["--num-images", "1", "--steps", "2", "--resolution", "32"]


# ------------------------------------------------------------------------------------- DreamBench


def test_parse_original_dreambench_file(dreambench):
    bench = parse_dreambench(dreambench / "prompts_and_classes.txt")
    assert len(bench.classes) == 30 and bench.classes["backpack_dog"] == "backpack"
    assert bench.classes["bear_plushie"] == "stuffed animal"
    assert len(bench.object_prompts) == 25 and len(bench.live_prompts) == 25
    assert bench.object_prompts[0] == "a {0} {1} in the jungle"
    assert bench.live_prompts[-1] == "a cube shaped {0} {1}"
    # every template is categorised, with the paper's four examples where it names them (Appendix H)
    assert all(t in DREAMBENCH_CATEGORIES for t in bench.object_prompts + bench.live_prompts)
    assert DREAMBENCH_CATEGORIES["a {0} {1} with a city in the background"] == "background_replacement"
    assert DREAMBENCH_CATEGORIES["a {0} {1} on top of green grass with sunflowers around it"] == "situational_placement"
    assert DREAMBENCH_CATEGORIES["a {0} {1} floating in an ocean of milk"] == "object_composition"
    assert DREAMBENCH_CATEGORIES["a shiny {0} {1}"] == "attribute_editing"
    # the shares documented in accord.eval.benchmarks
    live = sum(c in LIVE_CLASSES for c in bench.classes.values())
    counts = Counter()
    for noun in bench.classes.values():
        for t in bench.live_prompts if noun in LIVE_CLASSES else bench.object_prompts:
            counts[DREAMBENCH_CATEGORIES[t]] += 1
    assert live == 9 and set(counts) == set(CATEGORIES)
    assert [round(100 * counts[c] / 750, 1) for c in CATEGORIES] == [20.4, 42.0, 17.6, 20.0]


def test_dreambench_prompts_fill_token_and_class(dreambench):
    prompts = dreambench_prompts(dreambench, ["dog", "backpack"], token="<new1>", max_prompts=12)
    dog = [p for p in prompts if p.subject == "dog"]
    assert dog[0].prompt == "a <new1> dog in the jungle"
    assert dog[10].prompt == "a <new1> dog wearing a red hat"  # live-subject list
    assert ([p for p in prompts if p.subject == "backpack"][10].prompt
            == "a <new1> backpack with a wheat field in the background")
    assert len(dog[0].references) == 5
    with pytest.raises(DataError, match="not in"):
        dreambench_prompts(dreambench, ["unicorn"])


def test_generic_and_stylebench_prompt_files(tmp_path, dreambench):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na {0} {1} on the moon\n\na painting of a {trigger} {class_noun}\n")
    got = folder_prompts(dreambench / "cat", prompts, "sks", "cat")
    assert [p.prompt for p in got] == ["a sks cat on the moon", "a painting of a sks cat"]
    styles = tmp_path / "styles"
    (styles / "water_color").mkdir(parents=True)
    (styles / "water_color" / "a.png").write_bytes((dreambench / "cat" / "00.jpg").read_bytes())
    got = stylebench_prompts(styles, prompts)
    assert got[0].prompt == "a sks water color on the moon" and got[0].category == "style"
    prompts.write_text("a {2} cat\n")
    with pytest.raises(DataError, match="placeholder"):
        folder_prompts(dreambench / "cat", prompts)


# ----------------------------------------------------------------------------------- accord eval


def test_eval_end_to_end_on_tiny_pipeline(tmp_path, tiny_model_dir, dreambench, metric_dirs):
    out = tmp_path / "report"
    argv = ["--model", str(tiny_model_dir("sd")), "--data", str(dreambench), "--subjects", "backpack,dog",
            "--max-prompts", "2", *FAST, "--out", str(out), *_model_flags(metric_dirs)]
    assert _run(argv) == 0
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["subject"] for r in rows} == {"backpack", "dog"}
    assert all(float(r[m]) == float(r[m]) for r in rows for m in ("clip_t", "clip_i", "dino_i", "blip_t"))
    html = (out / "report.html").read_text()
    assert "By prompt category" in html and "situational_placement" in html and "grids/dog.png" in html
    for f in ("summary.csv", "plots/by_category.png", "grids/backpack.png", "images/manifest.csv"):
        assert (out / f).is_file(), f

    # the same images, scored again from the folder: same numbers
    again = tmp_path / "again"
    assert _run(["--images", str(out / "images"), "--data", str(dreambench), "--subjects", "backpack,dog",
                 "--max-prompts", "2", "--metrics", "clip_i,dino_i", "--out", str(again),
                 *_model_flags(metric_dirs)]) == 0
    with (again / "scores.csv").open() as f:
        rescored = list(csv.DictReader(f))
    for a, b in zip(rows, rescored):
        assert float(a["dino_i"]) == pytest.approx(float(b["dino_i"]), abs=1e-4)


def test_eval_user_errors_are_one_line(tmp_path, dreambench, metric_dirs):
    base = ["--data", str(dreambench), "--out", str(tmp_path / "o"), *_model_flags(metric_dirs)]
    with pytest.raises(ConfigError, match="exactly one of --model"):
        _run(base)
    with pytest.raises(ConfigError, match="unknown clip_x"):
        _run(["--images", str(tmp_path), "--metrics", "clip_x", *base])
    with pytest.raises(DataError, match="manifest.csv"):
        _run(["--images", str(tmp_path), "--subjects", "dog", *base])
    with pytest.raises(ConfigError, match="--prompts"):
        _run(["--images", str(tmp_path), "--benchmark", "generic", *base])


# ------------------------------------------------------------------------------------- best step


def test_parse_criterion():
    assert parse_criterion("dino_i").weights == {"dino_i": 1.0}
    assert parse_criterion("gram_d").weights == {"gram_d": -1.0}
    assert parse_criterion("0.5*clip_t + 0.5*dino_i").weights == {"clip_t": 0.5, "dino_i": 0.5}
    assert parse_criterion("clip_t-0.001*gram_d")({"clip_t": 30.0, "gram_d": 1000.0}) == pytest.approx(29.0)
    for bad in ("clip_x", "0.5*clip_t 0.5*dino_i", "2*"):
        with pytest.raises(ConfigError):
            parse_criterion(bad)


def test_best_step_over_checkpoints(tmp_path, tiny_model_dir, dreambench, metric_dirs):
    from safetensors.torch import save_file

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained": str(tiny_model_dir("sd"))},
                                                         "data": {"trigger": "<s1>", "class_noun": "dog"}}))
    for step, seed in ((100, 0), (200, 1)):
        ckpt = run_dir / "checkpoints" / f"step-{step:06d}"
        ckpt.mkdir(parents=True)
        save_file({"<s1>": torch.randn(32, generator=torch.Generator().manual_seed(seed))},
                  str(ckpt / "learned_embeds.safetensors"))
    out = tmp_path / "best"
    argv = ["--model", str(run_dir), "--data", str(dreambench), "--subjects", "dog", "--max-prompts", "2", *FAST,
            "--metrics", "clip_t,dino_i", "--best-step", "0.5*clip_t+0.5*dino_i", "--out", str(out),
            *_model_flags(metric_dirs)]
    assert _run(argv) == 0
    result = json.loads((out / "best_step.json").read_text())
    with (out / "best_step.csv").open() as f:
        curve = list(csv.DictReader(f))
    assert [int(c["step"]) for c in curve] == [100, 200]
    scores = {int(c["step"]): float(c["criterion"]) for c in curve}
    assert result["best_step"] == max(scores, key=scores.get)
    assert (out / "best_step.png").is_file()
    # the trigger came from config.yaml
    with (out / "checkpoints" / "step-100" / "manifest.csv").open() as f:
        assert next(csv.DictReader(f))["prompt"] == "a <s1> dog in the jungle"


# ----------------------------------------------------------- trained outputs load through load_into


def test_eval_and_best_step_on_a_custom_diffusion_run(tmp_path, tiny_model_dir, dreambench, metric_dirs):
    """A real 2-step Custom Diffusion run (processors + modifier token, which only the method's own
    ``load_into`` loads): eval's images differ from the base model's, and a checkpoint applied to the
    base pipeline and unloaded again leaves the base model's images."""
    import numpy as np
    from PIL import Image
    from trainkit import make_refs, tiny_config

    from accord.eval.pipelines import generate, load_adapters, load_pipeline, unload_adapters
    from accord.train import train

    base = tiny_model_dir("sd")
    out = tmp_path / "run"
    train(tiny_config(base, make_refs(tmp_path / "refs", captions=["1 <new1> backpack, park"] * 2), out,
                      method={"name": "custom_diffusion"},
                      data={"trigger": "<new1>"}, train={"max_steps": 2, "batch_size": 1, "checkpoint_every": 1}),
          progress=False)

    def images(folder):
        with (folder / "manifest.csv").open() as f:
            return {r["file"]: np.asarray(Image.open(folder / r["file"]), dtype=np.int16) for r in csv.DictReader(f)}

    common = ["--data", str(dreambench), "--subjects", "backpack", "--max-prompts", "1", *FAST, "--metrics", "clip_t",
              *_model_flags(metric_dirs)]
    assert _run(["--model", str(out), "--out", str(tmp_path / "trained"), *common]) == 0
    assert _run(["--model", str(base), "--token", "<new1>", "--out", str(tmp_path / "base"), *common]) == 0
    trained, stock = images(tmp_path / "trained" / "images"), images(tmp_path / "base" / "images")
    assert trained.keys() == stock.keys()
    assert all(np.abs(trained[k] - stock[k]).max() > 0 for k in trained)

    # best-step's sweep: a checkpoint applied to the loaded base pipeline, then unloaded, leaves the base
    pipe = load_pipeline(base)

    def sample():
        return np.asarray(generate(pipe, "a <new1> backpack", 1, 2, 7.5, 0, 32, 32)[0], dtype=np.int16)

    before = sample()
    method = load_adapters(pipe, out / "checkpoints" / "step-000001")
    assert method.name == "custom_diffusion" and np.abs(sample() - before).max() > 0
    assert unload_adapters(pipe, method)
    np.testing.assert_array_equal(sample(), before)
