"""The coupling lab: exact renderer labels, the shipped detector on fresh renders, the pretrain recipe
(smoke mode), and a shortened ``accord demo`` end to end."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from accord.lab import task
from accord.lab.world import (
    BACKGROUNDS,
    COLORS,
    PATTERNS,
    Obj,
    Scene,
    caption,
    parse_caption,
    random_caption,
    random_scene,
    render,
)


def test_render_draws_exactly_the_described_scene():
    scene = Scene("blue", (Obj("square", "red", place="left"), Obj("circle", "yellow", place="right")))
    img = render(scene)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[16, 8]) == COLORS["red"]  # square centre
    assert tuple(img[16, 24]) == COLORS["yellow"]  # circle centre
    assert tuple(img[1, 16]) == BACKGROUNDS["blue"]  # a corner of the sky
    colors = {tuple(c) for c in img.reshape(-1, 3)}
    assert colors == {COLORS["red"], COLORS["yellow"], BACKGROUNDS["blue"]}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_are_visible_and_distinct(pattern):
    img = render(Scene("black", (Obj("square", "green", pattern, "center", size=14),)))
    inside = {tuple(c) for c in img[12:20, 12:20].reshape(-1, 3)}
    assert len(inside) == (1 if pattern == "solid" else 2)


def test_captions_round_trip_to_the_labels():
    rng = random.Random(0)
    for _ in range(200):
        scene = random_scene(rng, patterns=PATTERNS)
        asked = parse_caption(caption(scene))
        assert asked["background"] == scene.background
        assert set(asked["objects"]) == scene.shapes()
        for o in scene.objects:
            want = asked["objects"][o.shape]
            assert want["color"] == o.color
            assert want.get("pattern", "solid") == o.pattern
            assert want.get("place", "center") == o.place
        assert len(scene.shapes()) == len(scene.objects)  # distinct shapes: one label slot per shape
        assert all(o.color != scene.background for o in scene.objects)
        parse_caption(random_caption(rng, scene))  # partial captions parse too


def test_pretraining_corpus_never_shows_the_subjects_pattern():
    rng = random.Random(1)
    assert all(o.pattern != task.SUBJECT.pattern for _ in range(500) for o in random_scene(rng).objects)


def test_coupling_task_references_and_protocol():
    scenes = task.reference_scenes()
    assert 4 <= len(scenes) <= 6
    assert all({task.SUBJECT.shape, task.COUPLED.shape} == s.shapes() for s in scenes)
    caps = [task.reference_caption(s) for s in scenes]
    assert all(c.startswith("sks circle, yellow triangle, ") for c in caps)
    assert {p.category for p in task.PROMPTS} == set(task.CATEGORIES)
    assert sum(not p.asks_coupled for p in task.PROMPTS) > len(task.PROMPTS) / 2
    assert parse_caption("blue sks circle on the left, gray background", task.names()) == {
        "background": "gray", "objects": {"circle": {"color": "blue", "place": "left"}}}


def _shipped_or_skip():
    from accord.errors import AccordError
    from accord.lab.judge import weights_dir

    try:
        return weights_dir()
    except AccordError as exc:
        pytest.skip(str(exc))


def test_shipped_detector_is_accurate_on_fresh_renders():
    from accord.lab.judge import Judge
    from accord.lab.quality import detector_accuracy
    from accord.lab.world import PLACES

    judge = Judge(_shipped_or_skip())
    acc = detector_accuracy(judge, n=300, seed=12345)  # not a training seed
    assert min(acc.values()) >= 0.95, acc  # measured figures: benchmarks/RESULTS.md
    assert PLACES


def test_t2i_bar_counts_objects_colours_patterns_background_and_all_asked_also_places():
    from accord.lab.quality import t2i_scores

    prompt = "red square on the left, yellow striped circle, green background"
    right = {"background": "green", "objects": {"square": {"color": "red", "pattern": "solid", "place": "left"},
                                                "circle": {"color": "yellow", "pattern": "striped", "place": "right"}}}
    sides = {"background": "green", "objects": {**right["objects"], "square": {**right["objects"]["square"],
                                                                              "place": "right"}}}
    colour = {"background": "green", "objects": {**right["objects"], "circle": {**right["objects"]["circle"],
                                                                               "color": "red"}}}
    scores = [t2i_scores([prompt], [d]) for d in (right, sides, colour)]
    assert [(s["compositional"], s["all_asked"]) for s in scores] == [(1.0, 1.0), (1.0, 0.0), (0.0, 0.0)]
    assert scores[1]["places"] == 0.0 and scores[2]["colors"] == 0.0 and scores[2]["patterns"] == 1.0


def test_terms_summary_takes_each_runs_last_checkpoint_and_the_base():
    from accord.lab.report import format_terms, summarize_terms

    def run(seed, last):
        terms = {"0": dict(personal=1.0, general=2.0, null=3.0, shift=0.5),
                 "10": dict(personal=9.0, general=9.0, null=9.0, shift=9.0),
                 "150": dict(personal=last, general=2 * last, null=0.0, shift=3 * last)}
        return {"setting": {"method": "lora", "regularizer": "dd", "seed": seed}, "dependence_terms": terms}

    rows = summarize_terms([run(0, 1.0), run(1, 3.0), {"setting": {"method": "lora", "regularizer": "none"}}])
    assert len(rows) == 1 and rows[0]["seeds"] == 2
    assert rows[0]["personal"][0] == 2.0 and rows[0]["shift"][0] == 6.0 and rows[0]["base_null"] == (3.0, 0.0)
    assert "3.00e+00 ± 0.0e+00 → 0.00e+00 ± 0.0e+00" in format_terms(rows)


def test_sample_grid_is_upscaled_labelled_and_frames_leaks(tmp_path):
    from PIL import Image

    from accord.lab.report import sample_grid

    images = np.zeros((4, 32, 32, 3), np.uint8)
    images[1] = 255  # one white image
    rows = [{"prompt": "sks circle, green background", "leak": 0.0}, {"prompt": "sks circle, green background",
                                                                       "leak": 1.0},
            {"prompt": "sks circle, triangle, blue background", "leak": 0.0}, {"prompt": "x", "leak": 0.0}]
    path = sample_grid({"setting": {"images_per_prompt": 2}, "rows": rows}, images, tmp_path / "g.png", scale=4)
    grid = np.asarray(Image.open(path).convert("RGB"))
    side, pad, label = 128, 4, 300
    assert grid.shape == (2 * (side + pad), label + 2 * (side + pad), 3)
    tile = grid[:side, label + side + pad:label + 2 * side + pad]  # row 0, image 1: the leak
    assert (tile[0, side // 2] == (220, 0, 0)).all() and (tile[side // 2, side // 2] == 255).all()
    assert (grid[:side, label:label + side] == 0).all()  # image 0: no frame, black as drawn
    assert (grid[:side, :label] < 128).any(axis=-1).sum() > 50  # the prompt is written in the label column


def test_pretrain_cli_offers_every_stage():
    import argparse

    from accord.commands.lab import add_arguments
    from accord.lab.pretrain import STAGES

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert tuple(parser.parse_args(["pretrain", *[a for s in STAGES for a in ("--stage", s)]]).stage) == STAGES


def test_unet_focus_draws_its_share_of_timesteps_from_the_noisiest():
    from accord.lab.pretrain import timesteps

    n, plain = 50_000, torch.randint(0, 1000, (50_000,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(timesteps(n, 1000, torch.Generator().manual_seed(3)), plain)  # the unet stage's draw
    t = timesteps(n, 1000, torch.Generator().manual_seed(3), focus=0.6, window=400)
    assert 0 <= t.min() and t.max() < 1000
    assert abs((t >= 600).float().mean().item() - (0.6 + 0.4 * 0.4)) < 0.01  # focused share + uniform's own


def test_grown_unet_predicts_as_the_unet_it_grew_from_until_trained():
    from accord.lab.models import EMBED, grow_cross_attention, lab_unet

    torch.manual_seed(0)
    unet = lab_unet().eval()
    grown = grow_cross_attention(unet).eval()
    assert [type(b).__name__ for b in grown.down_blocks][0] == "CrossAttnDownBlock2D"
    assert [type(b).__name__ for b in grown.up_blocks][-1] == "CrossAttnUpBlock2D"
    assert all(a.transformer_blocks[0].only_cross_attention for a in grown.down_blocks[0].attentions)
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 7, EMBED)
    with torch.no_grad():
        assert torch.equal(grown(x, t, encoder_hidden_states=text).sample,
                           unet(x, t, encoder_hidden_states=text).sample)
        for a in grown.up_blocks[-1].attentions:  # the new blocks do read the text once their projection is trained
            torch.nn.init.normal_(a.proj_out.weight, std=0.1)
        a, b = (grown(x, t, encoder_hidden_states=e).sample for e in (text, text.flip(1)))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="already has attention"):
        grow_cross_attention(grown)


@pytest.mark.slow
def test_pretrain_recipe_runs_in_smoke_mode(tmp_path):
    from accord.cli import main
    from accord.lab.judge import Judge

    assert main(["lab", "pretrain", "--smoke", "--out", str(tmp_path / "w")]) == 0
    judge = Judge(tmp_path / "w")  # the assembled folder loads as a judge and as a pipeline
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "w" / "sd")
    assert pipe.unet.dtype.is_floating_point and str(pipe.unet.dtype) == "torch.float32"
    assert len(judge.detect([render(random_scene(random.Random(0)))])) == 1
    from safetensors.torch import load_file

    name = "diffusion_pytorch_model.safetensors"
    grown, shipped = (load_file(tmp_path / "w" / d / name) for d in ("stages/unet-grow", "sd/unet"))
    assert grown.keys() == shipped.keys() and all(torch.equal(grown[k].half(), shipped[k]) for k in grown)
    assert any(k.startswith("down_blocks.0.attentions.") for k in shipped)  # the grown 16x16 cross-attention
    assert main(["lab", "quality", "--weights", str(tmp_path / "w"), "--captions", "2", "--renders", "20",
                 "--sample-steps", "2", "--write"]) == 0
    assert (tmp_path / "w" / "quality.json").is_file()


@pytest.mark.slow
def test_demo_end_to_end_shortened(tmp_path):
    from accord.cli import main

    weights = _shipped_or_skip()
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--method", "lora", "--seeds", "1", "--steps", "2", "--images", "1",
                 "--sample-steps", "2", "--weights", str(weights), "--no-progress"]) == 0
    html = (out / "report.html").read_text()
    assert "leak rate" in html and "leak_rates.png" in html
    assert (out / "leak_rates.png").is_file() and (out / "dependence_shift.png").is_file()
    assert "| lora | dd-conditional |" in (out / "summary.md").read_text() and "object-object-generic" in html
    assert "Leak rate" in html and "Eq. 7" in html  # the verdict and the terms over training
    for name in ("lora-none-s0", "lora-dd-conditional-s0"):
        assert f"samples-{name}.png" in html and (out / f"samples-{name}.png").is_file()


def test_bench_regularizer_names_and_weights():
    from accord.errors import AccordError
    from accord.lab.runner import DD_WEIGHT, regularizer_config, settings_for

    # "dd" is Eq. 8 as written whatever accord.dd_variant's default; dd-conditional the chosen form at its weight
    assert regularizer_config("dd") == {"accord": {"dd_weight": DD_WEIGHT, "dd_variant": "paper"}}
    assert regularizer_config("dd@20") == {"accord": {"dd_weight": 20.0, "dd_variant": "paper"}}
    assert regularizer_config("dd-conditional") == {"accord": {"dd_weight": DD_WEIGHT, "dd_variant": "conditional"}}
    assert regularizer_config("sude@0.8") == {"regularizers": {"sude_weight": 0.8}}
    assert regularizer_config("dd-sg@600") == {"accord": {"dd_weight": 600.0, "dd_variant": "frozen_personal"}}
    assert regularizer_config("dd-composition@0.2") == {"accord": {"dd_weight": 0.2, "dd_variant": "composition"}}
    for bad in ("ddd", "dd@", "dd@-1", "dd@x", "prior@2"):
        with pytest.raises(AccordError, match="NAME@WEIGHT"):
            regularizer_config(bad)
    assert "sude" in settings_for("lora") and "classdiffusion" not in settings_for("lora")
    assert {"pd", "classdiffusion", "sude"} <= set(settings_for("textual_inversion"))


def test_lab_recipes_are_registered_methods(capsys):
    """The lab's recipes name registered methods with their own keys; the protocol's rows per method stay as they
    were; a registered method without a recipe is named as such."""
    from accord.cli import main
    from accord.config import config_from_dict
    from accord.lab.runner import DEFAULT_METHODS, METHODS, settings_for
    from accord.methods.base import method_names

    assert set(DEFAULT_METHODS) <= set(method_names())
    for name, recipe in METHODS.items():
        method = config_from_dict({"method": recipe["method"]}).method
        assert method.name == name.removesuffix("+text")
        assert getattr(method, "train_text_encoder", False) == name.endswith("+text")
    assert {m: settings_for(m) for m in METHODS} == {
        "lora": ["none", "dd", "dd-conditional", "sude"],
        "dreambooth": ["none", "dd", "dd-conditional", "prior", "sude"],
        "textual_inversion": ["none", "dd", "dd-conditional", "pd", "dd+pd", "sude", "classdiffusion"],
        "custom_diffusion": ["none", "dd", "dd-conditional", "pd", "dd+pd", "prior", "sude", "classdiffusion"],
        "break_a_scene": ["none", "dd", "dd-conditional"],
        # the text encoder is trained, so the trigger phrase's features are learned: PDLoss applies
        "lora+text": ["none", "dd", "dd-conditional", "pd", "dd+pd", "sude", "classdiffusion"],
        "dreambooth+text": ["none", "dd", "dd-conditional", "pd", "dd+pd", "prior", "sude", "classdiffusion"]}
    assert set(METHODS) - set(DEFAULT_METHODS) == {"lora+text", "dreambooth+text"}
    assert main(["lab", "bench", "--methods", "ip_adapter", "--output", "unused"]) != 0
    assert "--methods 'ip_adapter' has no lab recipe" in capsys.readouterr().err


def test_bench_refuses_a_regularizer_no_method_takes(capsys):
    from accord.cli import main

    assert main(["lab", "bench", "--methods", "lora", "--regularizers", "pd", "--output", "unused"]) != 0
    err = capsys.readouterr().err
    assert "--regularizers 'pd' applies to none of --methods lora" in err and "Traceback" not in err
    assert "add one of textual_inversion custom_diffusion lora+text dreambooth+text" in err


@pytest.mark.slow
def test_bench_comparator_and_break_a_scene_rows_run(tmp_path):
    from accord.cli import main

    weights = _shipped_or_skip()
    out = tmp_path / "bench"
    assert main(["lab", "bench", "--methods", "textual_inversion", "break_a_scene", "--regularizers", "sude",
                 "classdiffusion", "dd@20", "--seeds", "1", "--steps", "2", "--images", "1", "--sample-steps", "1",
                 "--weights", str(weights), "--output", str(out), "--no-progress"]) == 0
    summary = (out / "summary.md").read_text()
    for row in ("textual_inversion | sude", "textual_inversion | classdiffusion", "textual_inversion | dd@20",
                "break_a_scene | dd@20"):
        assert f"| {row} |" in summary
    assert "| break_a_scene | sude |" not in summary  # SuDe does not apply to Break-A-Scene: no row, no run


def test_masked_references_hold_the_subjects_exact_pixels(tmp_path):
    import json

    from PIL import Image

    from accord.data.references import scan_references

    folder = task.write_masked_references(tmp_path / "refs", "<asset0>")
    entries = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(entries) == len(task.reference_scenes())
    for entry, scene in zip(entries, task.reference_scenes()):
        mask = np.asarray(Image.open(folder / entry["masks"]["<asset0>"])) > 0
        image = np.asarray(Image.open(folder / entry["file_name"]))
        subject = scene.find(task.SUBJECT.shape)
        assert mask.sum() > 50 and (image[mask] != BACKGROUNDS[scene.background]).any(axis=-1).all()
        assert entry["general"] == f"yellow triangle, {scene.background} background"
        assert subject is not None
    refs = scan_references(folder, trigger="<asset0>", class_noun="circle")
    assert len(refs) == len(entries)  # the masks are not taken for references



def test_clip_stage_negatives_and_token_targets_bind_colours_to_shapes():
    """The mini-CLIP stage's hard negatives include the colour exchange between two objects (same words, other
    binding), and its token-level head is taught each shape word's own colour and pattern."""
    import random

    from accord.lab import models as M
    from accord.lab.pretrain import hard_negative, token_targets, tokenize
    from accord.lab.world import COLORS, PATTERNS

    rng = random.Random(0)
    text = "red square on the left, yellow striped circle, green background"
    negatives = {hard_negative(rng, text) for _ in range(200)}
    exchange = "yellow square on the left, red striped circle, green background"  # same words, other binding
    words = lambda caption: sorted(caption.replace(",", "").split())  # noqa: E731
    assert exchange in negatives and text not in negatives
    assert all(words(n) != words(text) for n in negatives - {exchange})  # the others change a word
    assert {hard_negative(rng, "blue diamond, black background") for _ in range(50)} <= {
        f"{c} {s}, black background" for c in COLORS for s in ("square", "circle", "triangle", "diamond")} - {
        "blue diamond, black background"}
    tok = M.tokenizer()
    rows, cols, colours, patterns = token_targets(tok, [text, "blue diamond"], tokenize(tok, [text, "blue diamond"]))
    ids = tok([text, "blue diamond"]).input_ids
    words = [tok.convert_ids_to_tokens(ids[r][c]) for r, c in zip(rows.tolist(), cols.tolist())]
    assert words == ["square</w>", "circle</w>", "diamond</w>"]
    assert [list(COLORS)[i] for i in colours] == ["red", "yellow", "blue"]
    assert [PATTERNS[i] for i in patterns] == ["solid", "striped", "solid"]


def test_dependence_terms_add_up_to_the_shift(tmp_path):
    """Eq. 7's three terms measured apart are non-negative and bound the shift: mean|Δ| ≥ |mean(p + g − ∅)|,
    and a single draw of one reference makes that an equality."""
    from accord.inference import load_trained
    from accord.lab import task
    from accord.lab.judge import model_dir
    from accord.lab.runner import dependence_shift, dependence_terms

    refs = tmp_path / "refs"
    task.write_references(refs)
    for extra in sorted(refs.glob("*.png"))[1:]:
        extra.unlink()
        extra.with_suffix(".txt").unlink()
    pipe = load_trained(model_dir())
    terms = dependence_terms(pipe, refs, task.TRIGGER, draws=1)
    assert min(terms["personal"], terms["general"], terms["null"]) >= 0 and terms["shift"] > 0
    assert (abs(terms["shift"] - abs(terms["personal"] + terms["general"] - terms["null"]))
            < 1e-6 * max(1.0, terms["null"]))
    assert dependence_shift(pipe, refs, task.TRIGGER, draws=1) == terms["shift"]
