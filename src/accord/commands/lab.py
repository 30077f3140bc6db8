"""``accord lab``: the synthetic coupling lab — ``pretrain`` its miniature models, measure their ``quality``,
``bench`` the methods."""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="lab_command", metavar="SUBCOMMAND")
    p = sub.add_parser("pretrain",
                       help="train the lab's autoencoder, mini-CLIP, detector and text-to-image UNet from scratch")
    p.add_argument("--out", default="accord-lab-weights", help="weights folder (pass it as --weights to demo/bench)")
    p.add_argument("--stage", action="append",
                   choices=("vae", "clip", "detector", "unet", "unet-focus", "unet-grow", "assemble"),
                   help="run only these stages (repeatable; default all, in order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps per stage: proves the recipe runs")
    b = sub.add_parser("bench",
                       help="every method x {none, DDLoss, PDLoss, both, prior} on the coupling task, over seeds")
    b.add_argument("--output", help="run folder (report.html, summary.md, runs/; default: accord-lab-bench, "
                   "protocol 2: accord-lab-bench-v2)")
    b.add_argument("--methods", nargs="+", help="methods to bench (default: every method with a lab recipe, all but "
                   "the image-encoder ones; protocol 2: lora dreambooth). lora+text and dreambooth+text (the text "
                   "encoder trained too, so PDLoss applies) run only when named")
    b.add_argument("--regularizers", nargs="+",
                   help="subset of none dd dd-conditional pd dd+pd prior sude classdiffusion (default: all that "
                   "apply to each method; protocol 2: none dd dd-conditional; dd is Eq. 8 as written, "
                   "dd-conditional DDLoss's conditional form); "
                   "NAME@WEIGHT (e.g. dd@20) adds an investigation run at another weight; dd-sg, dd-anchored, "
                   "dd-alignment, dd-composition, dd-conditional@WEIGHT are DDLoss's other forms "
                   "(accord.dd_variant; docs/regularizers.md)")
    b.add_argument("--seeds", type=int, help="training seeds per setting (default: 3; protocol 2: 5)")
    b.add_argument("--steps", type=int, help="training steps per run (default: 150; protocol 2: 600, or the last "
                   "--eval-at step)")
    b.add_argument("--images", type=int, help="images per evaluation prompt (default: 4; protocol 2: 2)")
    b.add_argument("--protocol", type=int, choices=(1, 2), default=1,
                   help="1: evaluate each run's final weights (the published numbers); 2: train to the longer "
                   "horizon, evaluate every --eval-at checkpoint, compare at matched fidelity (docs/lab.md)")
    b.add_argument("--eval-at", help="protocol 2: comma-separated steps to evaluate (default: the half and the end "
                   "of --steps, 300,600)")
    b.add_argument("--reference-step", type=int, help="protocol 2: the baseline's step that matched fidelity "
                   "compares at (default: the last --eval-at step)")
    b.add_argument("--quick", action="store_true", help="protocol 2's quick subset: 2 seeds, 100 steps evaluated at "
                   "50 and 100, 2 images, one prompt per category and one control (explicit options override)")
    b.add_argument("--sample-steps", type=int, default=25)
    b.add_argument("--weights", help="lab weights folder (default: the shipped one)")
    b.add_argument("--task", help="task YAML file, or a shipped task's name (default: object-object; docs/lab.md)")
    add_jobs_argument(b)
    b.add_argument("--no-progress", action="store_true")
    q = sub.add_parser("quality", help="measure the quality bars: detector accuracy, mini-CLIP retrieval, "
                       "T2I compositional accuracy")
    q.add_argument("--weights", help="lab weights folder (default: the shipped one)")
    q.add_argument("--captions", type=int, default=100, help="held-out captions for the T2I measurement")
    q.add_argument("--renders", type=int, default=1000, help="fresh renders for the detector measurement")
    q.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the T2I measurement")
    q.add_argument("--write", action="store_true", help="also write quality.json into the weights folder")


def _pretrain(args) -> int:
    from ..lab.pretrain import STAGES, Recipe, run_stage

    recipe = Recipe.smoke() if args.smoke else Recipe()
    recipe.seed = args.seed
    out = Path(args.out)
    seconds = {}
    for stage in args.stage or STAGES:
        print(f"accord lab pretrain: stage {stage}", flush=True)
        seconds[stage] = round(run_stage(stage, out, recipe), 1)
    import torch

    (out / "recipe.json").write_text(json.dumps({"recipe": recipe.__dict__, "seconds": seconds,
                                                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                                                 "date": time.strftime("%Y-%m-%d")}, indent=1))
    print(f"wrote {out} ({', '.join(f'{k} {v:.0f}s' for k, v in seconds.items())})")
    return 0


def _bench(args) -> int:
    from ..errors import AccordError
    from ..lab.experiment import run_experiment
    from ..lab.report import format_table, summarize
    from ..lab.runner import DEFAULT_METHODS, METHODS, applies, regularizer_config
    from ..lab.task import default_task, load_task
    from ..methods.base import method_names

    if args.protocol == 2:
        from ..lab.protocol import V2_METHODS, V2_REGULARIZERS

        args.methods = args.methods or list(V2_METHODS)
        args.regularizers = args.regularizers or list(V2_REGULARIZERS)
    args.methods = args.methods or list(DEFAULT_METHODS)
    for m in args.methods:
        if m not in METHODS:
            why = " has no lab recipe (the lab has no image encoder)" if m in method_names() else ""
            raise AccordError(f"--methods {m!r}{why}: choose from {', '.join(METHODS)}")
    for r in args.regularizers or []:
        regularizer_config(r)  # one-line error for an unknown name
        if not any(applies(r, m) for m in args.methods):
            takers = " ".join(m for m in METHODS if applies(r, m))
            raise AccordError(f"--regularizers {r!r} applies to none of --methods {' '.join(args.methods)}: add one "
                              f"of {takers}")
    task = load_task(args.task) if args.task else default_task()
    if args.protocol == 2:
        return _bench_v2(args, task)
    for opt in ("eval_at", "reference_step", "quick"):
        if getattr(args, opt):
            raise AccordError(f"--{opt.replace('_', '-')} applies only to --protocol 2")
    args.seeds = 3 if args.seeds is None else args.seeds
    args.steps = 150 if args.steps is None else args.steps
    args.images = 4 if args.images is None else args.images
    settings = _settings(args, task, args.seeds, steps=args.steps, images_per_prompt=args.images)
    intro = (f"{len(settings)} runs on task {task.name}: {', '.join(args.methods)}; {args.seeds} seed(s); "
             f"{args.steps} steps; "
             f"{args.images} images per prompt. 95% t-intervals over seeds.")
    results, report, seconds = run_experiment(settings, Path(args.output or "accord-lab-bench"),
                                              title="accord lab bench", intro=intro, weights=args.weights,
                                              progress=not args.no_progress, jobs=jobs(args))
    print(format_table(summarize(results)))
    print(f"\nreport: {report}  ({seconds / 60:.1f} min)")
    return 0


def _eval_steps(text: str) -> tuple[int, ...]:
    from ..errors import AccordError

    try:
        steps = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        steps = ()
    if not steps or steps[0] < 1:
        raise AccordError(f"--eval-at {text!r}: give positive step numbers separated by commas, e.g. 150,300,450,600")
    return steps


def v2_schedule(args) -> tuple[int, tuple[int, ...]]:
    """Protocol 2's horizon and evaluation steps from ``--steps``, ``--eval-at`` and ``--quick``: the given steps;
    else quick's own (100 steps, evaluated at 50 and 100) when ``--quick`` names no ``--steps``; else the quarters of
    ``--steps`` with ``--quick``, else its half and end (default 300 and 600), so ``--steps`` must then be a
    multiple of 4 or 2 (checkpoints are written every gcd of the evaluation steps: quarters of 150 would checkpoint
    every step)."""
    from ..errors import AccordError
    from ..lab.protocol import QUICK, V2_STEPS

    if args.eval_at:
        eval_at = _eval_steps(args.eval_at)
        steps = args.steps or eval_at[-1]
    elif args.quick and not args.steps:
        steps, eval_at = QUICK["steps"], QUICK["eval_at"]
    else:
        steps = args.steps or V2_STEPS
        parts = 4 if args.quick else 2
        if steps % parts:
            what = "quarters" if args.quick else "half and end"
            raise AccordError(f"--steps {steps}: without --eval-at protocol 2 evaluates the {what} of --steps; give "
                              f"a multiple of {parts} or the steps to evaluate with --eval-at")
        eval_at = tuple(steps * k // parts for k in range(1, parts + 1))
    if eval_at[-1] > steps:
        raise AccordError(f"--eval-at {','.join(map(str, eval_at))}: steps beyond --steps {steps}; raise --steps or "
                          "drop them")
    return steps, eval_at


def add_jobs_argument(parser) -> None:
    """``--jobs``, for the bench and the demo."""
    parser.add_argument("--jobs", type=int, help="runs at a time, each in its own process with one thread (default: "
                        "the usable CPU cores, at most 2)")


def task_seeds(task, n: int) -> tuple:
    """The task's first ``n`` seeds; a count outside 1..len(task.seeds) is one line."""
    from ..errors import AccordError

    if not 1 <= n <= len(task.seeds):
        raise AccordError(f"--seeds {n}: choose 1 to {len(task.seeds)} (the task's fixed seeds)")
    return task.seeds[:n]


def _settings(args, task, seeds: int, **fields) -> list:
    """One bench setting per seed × method × regularizer that applies to it (``--regularizers`` or the method's
    rows), in that order."""
    from ..lab.runner import Setting, applies, settings_for

    return [Setting(method=m, regularizer=r, seed=seed, sample_steps=args.sample_steps, task=task, **fields)
            for seed in task_seeds(task, seeds) for m in args.methods
            for r in (args.regularizers or settings_for(m)) if applies(r, m)]


def jobs(args) -> int:
    """``--jobs``, or the default (:func:`accord.lab.experiment.default_jobs`); a bad value is one line."""
    from ..errors import AccordError
    from ..lab.experiment import default_jobs

    n = getattr(args, "jobs", None)
    if n is None:
        return default_jobs()
    if n < 1:
        raise AccordError(f"--jobs {n}: give 1 or more runs at a time")
    return n


def _bench_v2(args, task) -> int:
    from ..errors import AccordError
    from ..lab.protocol import QUICK, V2_IMAGES, V2_SEEDS, quick_prompts, run_bench_v2
    quick = QUICK if args.quick else {}
    steps, eval_at = v2_schedule(args)
    seeds = args.seeds or quick.get("seeds", V2_SEEDS)
    images = args.images or quick.get("images", V2_IMAGES)
    task_seeds(task, seeds)  # before the reference step: the order of the checks users saw
    if args.reference_step is not None and args.reference_step not in eval_at:
        raise AccordError(f"--reference-step {args.reference_step}: choose one of the --eval-at steps "
                          f"{','.join(map(str, eval_at))}")
    prompts = quick_prompts(task) if args.quick else None
    settings = _settings(args, task, seeds, steps=steps, images_per_prompt=images, checkpoints=0, prompts=prompts)
    intro = (f"Protocol 2{' (quick subset)' if args.quick else ''}: {len(settings)} runs on task {task.name}: "
             f"{', '.join(args.methods)}; {seeds} seed(s); {steps} steps, evaluated at steps "
             f"{', '.join(map(str, eval_at))}; {len(settings[0].prompts)} prompts x {images} images per prompt. "
             "95% t-intervals over seeds.")
    folder = Path(args.output or "accord-lab-bench-v2")
    evals, report, seconds = run_bench_v2(settings, folder, eval_at, title="accord lab bench, protocol 2",
                                          intro=intro, reference_step=args.reference_step, weights=args.weights,
                                          progress=not args.no_progress, jobs=jobs(args))
    print((folder / "summary.md").read_text())
    print(f"\nreport: {report}  ({seconds / 60:.1f} min)")
    return 0


def _quality(args) -> int:
    from ..lab.experiment import quiet
    from ..lab.judge import weights_dir
    from ..lab.quality import measure

    quiet()
    q = measure(args.weights, n_t2i=args.captions, n_renders=args.renders, t2i_steps=args.sample_steps)
    q.pop("_t2i")
    text = json.dumps(q, indent=1)
    print(text)
    if args.write:
        (weights_dir(args.weights) / "quality.json").write_text(text + "\n")
    return 0


def run(args) -> int:
    if args.lab_command == "quality":
        return _quality(args)
    if args.lab_command == "pretrain":
        return _pretrain(args)
    if args.lab_command == "bench":
        return _bench(args)
    print("usage: accord lab {pretrain,quality,bench} ... (see accord lab --help)")
    return 2
