"""``accord lab``: the synthetic coupling lab — ``pretrain`` its miniature models, measure their ``quality``,
``bench`` the methods."""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="lab_command", metavar="SUBCOMMAND")
    p = sub.add_parser("pretrain", help="train the lab's autoencoder, mini-CLIP, detector and text-to-image UNet from scratch")
    p.add_argument("--out", default="accord-lab-weights", help="weights folder (pass it as --weights to demo/bench)")
    p.add_argument("--stage", action="append",
                   choices=("vae", "clip", "detector", "unet", "unet-focus", "unet-grow", "assemble"),
                   help="run only these stages (repeatable; default all, in order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps per stage: proves the recipe runs")
    b = sub.add_parser("bench", help="every method x {none, DDLoss, PDLoss, both, prior} on the coupling task, over seeds")
    b.add_argument("--output", default="accord-lab-bench", help="run folder (report.html, summary.md, runs/)")
    b.add_argument("--methods", nargs="+", help="methods to bench (default: every method with a lab recipe, all but "
                   "the image-encoder ones)")
    b.add_argument("--regularizers", nargs="+", help="subset of none dd pd dd+pd prior sude classdiffusion (default: all that apply to each method); NAME@WEIGHT (e.g. dd@20) adds an investigation run at another weight; dd-sg, dd-anchored, dd-alignment, dd-composition@WEIGHT are DDLoss's other forms (accord.dd_variant; docs/regularizers.md)")
    b.add_argument("--seeds", type=int, default=3, help="training seeds per setting")
    b.add_argument("--steps", type=int, default=150, help="training steps per run")
    b.add_argument("--images", type=int, default=4, help="images per evaluation prompt")
    b.add_argument("--sample-steps", type=int, default=25)
    b.add_argument("--weights", help="lab weights folder (default: the shipped one)")
    b.add_argument("--task", help="task YAML file, or a shipped task's name (default: object-object; docs/lab.md)")
    b.add_argument("--no-progress", action="store_true")
    q = sub.add_parser("quality", help="measure the quality bars: detector accuracy, mini-CLIP retrieval, T2I compositional accuracy")
    q.add_argument("--weights", help="lab weights folder (default: the shipped one)")
    q.add_argument("--captions", type=int, default=100, help="held-out captions for the T2I measurement")
    q.add_argument("--renders", type=int, default=1000, help="fresh renders for the detector measurement")
    q.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the T2I measurement")
    q.add_argument("--write", action="store_true", help="also write quality.json into the weights folder")


def _pretrain(args) -> int:
    from .pretrain import STAGES, Recipe, run_stage

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
    from ..methods.base import method_names
    from .experiment import run_experiment
    from .report import format_table, summarize
    from .runner import METHODS, Setting, applies, regularizer_config, settings_for
    from .task import default_task, load_task

    args.methods = args.methods or list(METHODS)
    for m in args.methods:
        if m not in METHODS:
            why = " has no lab recipe (the lab has no image encoder)" if m in method_names() else ""
            raise AccordError(f"--methods {m!r}{why}: choose from {', '.join(METHODS)}")
    for r in args.regularizers or []:
        regularizer_config(r)  # one-line error for an unknown name
        if not any(applies(r, m) for m in args.methods):
            raise AccordError(f"--regularizers {r!r} applies to none of --methods {' '.join(args.methods)} "
                              f"(PDLoss and ClassDiffusion need textual_inversion or custom_diffusion; prior needs "
                              "dreambooth or custom_diffusion)")
    task = load_task(args.task) if args.task else default_task()
    if not 1 <= args.seeds <= len(task.seeds):
        raise AccordError(f"--seeds {args.seeds}: choose 1 to {len(task.seeds)} (the task's fixed seeds)")
    settings = [Setting(method=m, regularizer=r, seed=seed, steps=args.steps, images_per_prompt=args.images,
                        sample_steps=args.sample_steps, task=task)
                for seed in task.seeds[:args.seeds] for m in args.methods
                for r in (args.regularizers or settings_for(m)) if applies(r, m)]
    intro = (f"{len(settings)} runs on task {task.name}: {', '.join(args.methods)}; {args.seeds} seed(s); "
             f"{args.steps} steps; "
             f"{args.images} images per prompt. 95% t-intervals over seeds.")
    results, report, seconds = run_experiment(settings, Path(args.output), title="accord lab bench", intro=intro,
                                              weights=args.weights, progress=not args.no_progress)
    print(format_table(summarize(results)))
    print(f"\nreport: {report}  ({seconds / 60:.1f} min)")
    return 0


def _quality(args) -> int:
    from .experiment import quiet
    from .judge import weights_dir
    from .quality import measure

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
