"""Lab tasks as YAML files (issue 17): the loader on every shipped task, one-line errors for bad task files,
and the default task reproducing the lab's first, hard-coded task exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from accord.cli import main
from accord.errors import ConfigError
from accord.lab import task as T
from accord.lab.judge import score
from accord.lab.world import Obj, Scene, parse_caption, render


def labels(scene: Scene) -> dict:
    """The detector's output format, exact: what a perfect detector reports for a rendered scene."""
    return {"background": scene.background,
            "objects": {o.shape: {"color": o.color, "pattern": o.pattern, "place": o.place} for o in scene.objects}}


# ------------------------------------------------------------------------------ the shipped tasks

def test_at_least_five_tasks_ship_covering_four_kinds():
    names = T.shipped_tasks()
    assert T.DEFAULT_TASK in names and len(names) >= 5
    kinds = {T.load_task(n).kind for n in names}
    assert {"object-object", "subject-background", "subject-pose", "style-content"} <= kinds


@pytest.mark.parametrize("name", T.shipped_tasks())
def test_shipped_task_loads_and_its_leak_is_what_every_reference_shows(name):
    t = T.load_task(name)
    assert t.name == name and t.source.endswith(f"{name}.yaml")
    assert 4 <= len(t.scenes) <= 8 and len(t.seeds) >= 3
    for scene in t.scenes:
        cap = t.reference_caption(scene)
        assert cap.startswith(f"{t.trigger} {t.class_noun}"), cap
        assert parse_caption(cap, t.names())["objects"].keys() <= scene.shapes()
        assert scene.find(t.subject.shape).pattern == t.subject.pattern
        # the coupled concept is in every reference, as the detector would label it
        assert t.leak.seen(labels(scene), t.subject.shape), (name, scene)
    assert {p.category for p in t.prompts} <= set(t.categories)
    counted = [p for p in t.prompts if p.leak_counted]
    assert len(counted) > len(t.prompts) / 2 and len(counted) < len(t.prompts)  # and one control prompt
    assert all(p.text.startswith(f"{t.trigger} ") or f" {t.trigger} " in p.text for p in t.prompts)


def test_only_the_drawable_task_gives_its_subject_a_look_the_base_model_drew():
    """An embedding-only method (Textual Inversion) cannot teach the frozen denoiser a pattern it never drew, so the
    task meant for it is the one whose subject pattern is in pretraining; the others' subjects are new looks."""
    from accord.lab.world import PRETRAIN_PATTERNS

    drawable = {n for n in T.shipped_tasks() if T.load_task(n).subject.pattern in PRETRAIN_PATTERNS}
    assert drawable == {"object-object-drawable"}
    t = T.load_task("object-object-drawable")
    assert all(o.pattern != t.subject.pattern for s in t.scenes for o in s.objects if o.shape != t.subject.shape)


@pytest.mark.parametrize("name,hidden", [("object-object-generic", "striped"), ("style-content", "striped")])
def test_coupled_look_is_in_the_images_but_not_in_the_captions(name, hidden):
    t = T.load_task(name)
    named = 0
    for i, scene in enumerate(t.scenes):
        others = [o for o in scene.objects if o.shape != t.subject.shape]
        assert others and all(o.pattern == hidden for o in others)
        cap = t.reference_caption(scene, i)
        assert hidden not in cap
        if t.captions.in_full(i):
            assert all(o.shape in cap for o in others)  # the object is named, generically
            named += 1
        else:
            assert cap == f"{t.trigger} {t.class_noun}"
    assert named >= 3  # most captions name it, so the general concept c_g has it


def test_mention_captions_that_fraction_of_references_in_full_and_the_rest_with_the_subject_alone(tmp_path):
    t = T.load_task("object-object-generic")
    for mention, named in [(1.0, [0, 1, 2, 3, 4]), (0.6, [1, 3, 4]), (0.4, [2, 4]), (0.2, [4])]:
        caps = [T.Captions(objects="shape", mention=mention)]
        task = T.Task(**{**t.__dict__, "captions": caps[0]})
        got = [i for i, scene in enumerate(task.scenes) if "triangle" in task.reference_caption(scene, i)]
        assert got == named, (mention, got)
        for i, scene in enumerate(task.scenes):
            full = f"sks circle, triangle, {scene.background} background"
            assert task.reference_caption(scene, i) == (full if i in named else "sks circle")
            assert task.general_caption(scene, i) == (full[len("sks circle, "):] if i in named else "")
    task = T.Task(**{**t.__dict__, "captions": T.Captions(objects="shape", mention=0.6)})
    folder = task.write_references(tmp_path / "refs")
    assert [(folder / f"{i:02d}.txt").read_text().strip() for i in range(5)] == [
        task.reference_caption(scene, i) for i, scene in enumerate(task.scenes)]


def test_general_scene_tells_ddloss_every_other_concept_while_the_captions_stay(tmp_path):
    from accord.data.references import scan_references

    t = T.load_task("subject-background")
    scene_task = T.Task(**{**t.__dict__, "captions": T.Captions(mention=0.6, general="scene")})
    folder = scene_task.write_references(tmp_path / "refs", trigger="zwx")
    items = scan_references(folder, "zwx", "circle")
    assert len(items) == len(t.scenes) == 5
    for i, (item, scene) in enumerate(zip(items, t.scenes)):
        other = next(o for o in scene.objects if o.shape != "circle")
        name = " ".join(w for w in (other.color, "" if other.pattern == "solid" else other.pattern, other.shape) if w)
        assert item.general == f"{name} on the {other.place}, {scene.background} background"
        assert item.caption == scene_task.reference_caption(scene, i).replace("sks ", "zwx ")  # captions unchanged
    assert [item.caption for item in items].count("zwx circle") == 2  # the template ones now have a c_g
    T.Task(**{**t.__dict__, "captions": T.Captions(mention=0.6)}).write_references(folder, trigger="zwx")
    assert not (folder / "metadata.jsonl").exists()
    assert [item.general for item in scan_references(folder, "zwx", "circle")].count("") == 2


def test_generated_references_are_seeded_and_keep_to_the_rules():
    t = T.load_task("subject-place")
    assert T.load_task("subject-place").scenes == t.scenes  # the same draw every time
    for scene in t.scenes:
        subject = scene.find(t.subject.shape)
        assert (subject.place, subject.size) == ("left", 14)
        assert len(scene.shapes()) == len(scene.objects)
        assert all(o.color != scene.background for o in scene.objects[1:])
    assert len({(s.background, s.objects[1]) for s in t.scenes}) == len(t.scenes)


def test_generator_draws_no_object_in_the_background_colour(tmp_path):
    data = yaml.safe_load((T.TASKS_DIR / "subject-background.yaml").read_text())
    data["references"]["generate"].update(count=8, background="blue")
    data["references"]["generate"]["objects"][1]["color"] = ["blue", "red"]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
    assert {s.objects[1].color for s in T.load_task(tmp_path / "t.yaml").scenes} == {"red"}


# ------------------------------------------------------------------------------ leak rules on fixed detections

def _det(background="green", **objects) -> dict:
    return {"background": background,
            "objects": {s: dict(zip(("color", "pattern", "place"), v.split())) for s, v in objects.items()}}


def test_background_leak_counts_every_prompt_that_does_not_ask_for_it():
    t = T.load_task("subject-background")
    on_purple = _det("purple", circle="red checkered left")
    assert t.score("sks circle, green background", on_purple)["leak"] == 1.0  # another background asked
    assert t.score("sks circle, white square", on_purple)["leak"] == 1.0  # no background asked
    assert t.score("sks circle, white square", _det("gray", circle="red checkered left"))["leak"] == 0.0
    assert t.score("sks circle, purple background", on_purple)["leak"] == 0.0  # asked for
    assert not [p for p in t.prompts if p.text == "sks circle, purple background"][0].leak_counted
    assert {p.text for p in t.prompts if p.leak_counted and "background" not in p.text} == {
        "sks circle on the left", "sks circle, white square", "sks circle, blue diamond", "white sks circle",
        "blue sks circle"}


def test_background_leak_asked_otherwise_counts_only_prompts_asking_another_background(tmp_path):
    data = yaml.safe_load((T.TASKS_DIR / "subject-background.yaml").read_text())
    data["leak"]["when"] = "asked_otherwise"
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
    t = T.load_task(tmp_path / "t.yaml")
    on_purple = _det("purple", circle="red checkered left")
    assert t.score("sks circle, green background", on_purple)["leak"] == 1.0
    assert t.score("sks circle, green background", _det("green", circle="red checkered left"))["leak"] == 0.0
    assert t.score("sks circle, white square", on_purple)["leak"] == 0.0  # asks no background: not counted
    assert not [p for p in t.prompts if p.text == "sks circle, white square"][0].leak_counted


def test_place_leak_is_the_subject_on_the_left_when_the_right_is_asked():
    t = T.load_task("subject-place")
    left, right = _det(diamond="green checkered left"), _det(diamond="green checkered right")
    asked_right = "sks diamond on the right, green background"
    assert (t.score(asked_right, left)["leak"], t.score(asked_right, right)["leak"]) == (1.0, 0.0)
    assert t.score(asked_right, _det(square="green checkered left"))["leak"] == 0.0  # no subject, nothing leaks
    assert t.score("sks diamond on the left, green background", left)["leak"] == 0.0
    assert t.score("sks diamond, green background", left)["leak"] == 0.0  # asks no place: not counted
    assert t.score("<sks> diamond on the right, green background", left, "<sks>")["leak"] == 1.0  # other triggers


def test_style_leak_is_a_striped_object_other_than_the_subject():
    t = T.load_task("style-content")
    prompt = "sks triangle, blue square, brown background"
    assert t.score(prompt, _det(triangle="yellow checkered left", square="blue striped right"))["leak"] == 1.0
    assert t.score(prompt, _det(triangle="yellow checkered left", square="blue solid right"))["leak"] == 0.0
    assert t.score(prompt, _det(triangle="yellow striped left"))["leak"] == 0.0  # the subject is not "others"
    asked = "sks triangle, blue striped square, black background"
    assert t.score(asked, _det(square="blue striped right"))["leak"] == 0.0


# ------------------------------------------------------------------------------ the default task is the old one

# The lab's first task as it was hard-coded before tasks were files (src/accord/lab/task.py, protocol 1).
_OLD_LAYOUT = [("blue", "left", 12, 0), ("purple", "right", 13, -2), ("gray", "left", 14, 2),
               ("blue", "right", 12, 3), ("purple", "left", 13, -3)]
_OLD_PROMPTS = [
    ("background", "sks circle, green background"), ("background", "sks circle, black background"),
    ("background", "sks circle, brown background"), ("placement", "sks circle on the left, green background"),
    ("placement", "sks circle on the right, black background"),
    ("placement", "sks circle on the left, brown background"),
    ("composition", "sks circle, blue square, brown background"),
    ("composition", "sks circle, white diamond, gray background"),
    ("composition", "sks circle, green square, black background"),
    ("composition", "sks circle, yellow triangle, green background"),
    ("attribute", "blue sks circle, gray background"), ("attribute", "green sks circle, black background"),
    ("attribute", "white sks circle, brown background")]


def _old_scenes() -> list[Scene]:
    out = []
    for bg, place, size, dy in _OLD_LAYOUT:
        other = "right" if place == "left" else "left"
        out.append(Scene(bg, (Obj("circle", "red", "checkered", place, size=size, dy=dy),
                              Obj("triangle", "yellow", "solid", other, size=13, dy=-dy))))
    return out


def test_default_task_reproduces_the_hard_coded_one(tmp_path):
    t = T.default_task()
    assert T.load_task(T.TASKS_DIR / "object-object.yaml") == t
    assert (t.trigger, t.class_noun, t.subject.obj, T.COUPLED) == (
        "sks", "circle", Obj("circle", "red", "checkered"), Obj("triangle", "yellow", "solid"))
    assert t.reference_scenes() == T.reference_scenes() == _old_scenes()
    for scene, old in zip(t.scenes, _old_scenes()):
        assert np.array_equal(render(scene), render(old))
    assert [T.reference_caption(s) for s in t.scenes] == [
        "sks circle, yellow triangle, blue background", "sks circle, yellow triangle, purple background",
        "sks circle, yellow triangle, gray background", "sks circle, yellow triangle, blue background",
        "sks circle, yellow triangle, purple background"]
    assert [(p.category, p.text) for p in T.PROMPTS] == _OLD_PROMPTS
    assert [p.asks_coupled for p in T.PROMPTS] == ["triangle" in text for _, text in _OLD_PROMPTS]
    assert T.CATEGORIES == ("background", "placement", "composition", "attribute")
    assert (T.SEEDS, T.PROTOCOL_VERSION) == ((0, 1, 2, 3, 4), 1)
    masked = [json.loads(x) for x in (T.write_masked_references(tmp_path / "m", "<asset0>") / "metadata.jsonl")
              .read_text().splitlines()]
    assert [m["general"] for m in masked] == [f"yellow triangle, {bg} background" for bg, *_ in _OLD_LAYOUT]
    assert masked[0]["caption"] == "a photo of <asset0>, yellow triangle, blue background"


def test_default_task_scores_fixed_detections_as_the_old_rule():
    rng = np.random.default_rng(0)
    shapes, colors, patterns, places = ("square", "circle", "triangle", "diamond"), ("red", "yellow", "blue"), \
        ("solid", "striped", "checkered"), ("left", "center", "right")
    detections = [{"background": str(rng.choice(["green", "black", "gray"])),
                   "objects": {s: {"color": str(rng.choice(colors)), "pattern": str(rng.choice(patterns)),
                                   "place": str(rng.choice(places))} for s in shapes if rng.random() < 0.5}}
                  for _ in range(40)]
    t = T.default_task()
    seen = set()
    for trigger in ("sks", "<new1>"):
        for p in t.prompts:
            prompt = t.prompt_text(p, trigger)
            for d in detections:
                old = score(prompt, d, names={trigger: "circle"}, coupled="triangle", subject="circle",
                            subject_pattern="checkered")  # the rule the runner used before tasks were files
                assert t.score(prompt, d, trigger) == old, (prompt, d)
                seen.add(old["leak"])
    assert seen == {0.0, 1.0}


# ------------------------------------------------------------------------------ bad task files: one line each

def _default_yaml() -> dict:
    return yaml.safe_load((T.TASKS_DIR / "object-object.yaml").read_text())


def _edit(change):
    def make(tmp_path):
        data = _default_yaml()
        change(data)
        path = tmp_path / "task.yaml"
        path.write_text(yaml.safe_dump(data))
        return path
    return make


def _raw(text):
    def make(tmp_path):
        path = tmp_path / "task.yaml"
        path.write_text(text)
        return path
    return make


def _set(path: str, value):
    def change(data):
        *head, last = path.split(".")
        node = data
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        if value is _DROP:
            del node[last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return _edit(change)


_DROP = object()
BAD = {
    "unknown-key": (_set("subjekt", {}), ["unknown key", "did you mean 'subject'"]),
    "missing-trigger": (_set("subject.trigger", _DROP), ["subject.trigger: missing"]),
    "bad-colour": (_set("subject.color", "pink"), ["subject.color: 'pink' is not an object colour", "red, green"]),
    "bad-background": (_set("references.scenes.0.background", "teal"),
                       ["references.scenes[0].background: 'teal'", "choose one of"]),
    "two-circles": (_set("references.scenes.1.objects.1", {"use": "subject", "place": "left"}),
                    ["references.scenes[1].objects[1].shape", "one slot per shape"]),
    "no-subject": (_set("references.scenes.2.objects.0", {"shape": "square", "color": "red"}),
                   ["references.scenes[2].objects: no subject", "use: subject"]),
    "unknown-use": (_set("references.scenes.0.objects.1.use", "girl"), ["objects[1].use: 'girl'", "triangle"]),
    "size-out-of-range": (_set("references.scenes.0.objects.0.size", 99), ["objects[0].size", "4 to 32"]),
    "scenes-and-generate": (_set("references.generate", {"count": 2}), ["references: give exactly one of"]),
    "leak-kind": (_set("leak.kind", "size"), ["leak.kind: 'size' is not a leak kind", "object, background"]),
    "leak-key-misplaced": (_set("leak.background", "blue"), ["leak.background: does not apply to leak kind 'object'"]),
    "leak-when-misplaced": (_set("leak.when", "asked_otherwise"), ["leak.when: asked_otherwise needs kind"]),
    "prompt-without-trigger": (_set("prompts.0", ["background", "circle, green background"]),
                               ["prompts[0][1]", "does not name the subject"]),
    "prompt-not-a-pair": (_set("prompts.1", "sks circle, black background"), ["prompts[1]: expected [category"]),
    "unlisted-category": (_set("prompts.0.0", "lighting"), ["prompts[0][0]: category 'lighting'", "add it"]),
    "no-counted-prompt": (_set("prompts", [["composition", "sks circle, yellow triangle, green background"]]),
                          ["prompts: no prompt counts toward the leak rate"]),
    "bad-caption-rule": (_set("captions.objects", "all"), ["captions.objects: 'all'", "full, color, shape, omit"]),
    "mention-out-of-range": (_set("captions.mention", 1.5), ["captions.mention", "(0, 1]"]),
    "bad-general": (_set("captions.general", "all"), ["captions.general: 'all'", "caption, scene"]),
    "generator-runs-out": (_set("references", {"generate": {"count": 2, "background": "blue", "objects": [
        {"use": "subject", "place": ["left"]}, {"use": "triangle", "place": ["left"]}]}}),
        ["references.generate.objects[1].place", "taken by an earlier object"]),
    "not-yaml": (_raw("name: [unclosed\n"), ["line 2", "not valid YAML"]),
    "not-a-mapping": (_raw("- a list\n"), ["expected a mapping of name"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_task_file_is_one_line_naming_file_and_key(case, tmp_path, capsys):
    make, expect = BAD[case]
    path = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        T.load_task(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}"), message
    for text in expect:
        assert text in message, message
    assert main(["lab", "bench", "--task", str(path), "--methods", "lora", "--output", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err and len(err.strip().splitlines()) == 1, err


def test_unknown_task_name_lists_the_shipped_ones(capsys):
    assert main(["demo", "--task", "no-such-task", "--output", "unused"]) != 0
    err = capsys.readouterr().err
    assert "--task no-such-task: no such file" in err and "subject-background" in err and "Traceback" not in err


def test_bench_refuses_to_mix_tasks_in_one_folder(tmp_path, capsys):
    run = tmp_path / "runs" / "lora-none-s0"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"setting": {"steps": 150}}))  # a run from before tasks: default
    assert main(["lab", "bench", "--task", "subject-place", "--methods", "lora", "--regularizers", "none",
                 "--seeds", "1", "--output", str(tmp_path), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "holds runs of task 'object-object'" in err and "own --output folder" in err


def test_bench_refuses_runs_of_an_earlier_version_of_the_task(tmp_path, capsys):
    """style-content is version 2: its version-1 runs (no version in the record) were captioned otherwise."""
    run = tmp_path / "runs-v2" / "lora-none-s0"
    run.mkdir(parents=True)
    (run / "eval-step-2.json").write_text(json.dumps({"setting": {"steps": 2, "task": "style-content"}}))
    argv = ["lab", "bench", "--protocol", "2", "--task", "style-content", "--methods", "lora", "--regularizers",
            "none", "--seeds", "1", "--eval-at", "1,2", "--output", str(tmp_path), "--no-progress"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "holds protocol-v2 runs of task 'style-content' version 1 (lora-none-s0); the task is now version 2" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_setting_records_its_task_version():
    from accord.lab.runner import Setting

    assert Setting(task=T.load_task("style-content")).record()["task_version"] == 2
    assert Setting(task=T.load_task("object-object")).record()["task_version"] == 1


@pytest.mark.slow
def test_bench_runs_a_shipped_task_end_to_end(tmp_path):
    """About a minute on 2 CPU cores: the shortest `accord lab bench --task` run."""
    from accord.lab.judge import weights_dir

    out = tmp_path / "bench"
    assert main(["lab", "bench", "--task", "subject-place", "--methods", "lora", "--regularizers", "none",
                 "--seeds", "1", "--steps", "2", "--images", "1", "--sample-steps", "1", "--weights",
                 str(weights_dir()), "--output", str(out), "--no-progress"]) == 0
    result = json.loads((out / "runs" / "lora-none-s0" / "result.json").read_text())
    t = T.load_task("subject-place")
    assert result["setting"]["task"] == "subject-place"
    assert [r["prompt"] for r in result["rows"]] == [p.text for p in t.prompts]
    assert [r["asks_coupled"] for r in result["rows"]] == [p.asks_coupled for p in t.prompts]
    assert (out / "references" / "lora" / "00.txt").read_text().startswith("sks diamond, ")
    assert "### placement" in (out / "summary.md").read_text() and "subject-place" in (out / "report.html").read_text()


def test_the_documented_example_task_loads(tmp_path):
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "lab.md").read_text()
    example = doc.split("## An example")[1].split("```yaml\n")[1].split("```")[0]
    (tmp_path / "square-diamond.yaml").write_text(example)
    t = T.load_task(tmp_path / "square-diamond.yaml")
    assert t.reference_caption(t.scenes[0]).startswith("sks square, diamond, ")
    assert [p.leak_counted for p in t.prompts] == [True, True, False, True]
