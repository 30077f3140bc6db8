"""``accord demo``: fine-tuning with and without accord's decoupler on the lab's coupling task, on a CPU in minutes.

The lab model (shipped with accord) is fine-tuned on five references of a red checkered ``sks circle`` that
always stands next to a yellow striped triangle, which three captions call just "triangle" and two do not name
(task ``object-object-generic``). Each run then draws the fixed evaluation prompts, most of which do not ask for a
triangle, and the lab's detector counts how often one appears anyway (the leak rate), whether the prompt was
followed and whether the subject kept its look. Without a decoupler the trigger learns the triangle; with DDLoss's
conditional form (``accord.dd_variant: conditional``) it should not. The report is ``<output>/report.html``: the
table with 95% intervals over seeds, the paired change in leak, sample grids, and Eq. 7's terms over training.
"""

from __future__ import annotations

from pathlib import Path

from .lab import add_jobs_argument, jobs, task_seeds

__all__ = ["add_arguments", "run", "DEMO_TASK", "DECOUPLER"]

DEMO_TASK = "object-object-generic"
DECOUPLER = "dd-conditional"  # the lab's regularizer name of the decoupler the demo shows (accord.lab.runner)


def add_arguments(parser) -> None:
    parser.add_argument("--output", default="accord-demo", help="run folder (report.html, samples, results)")
    parser.add_argument("--method", default="dreambooth", choices=("dreambooth", "lora"),
                        help="method fine-tuned (DreamBooth: where the lab measured the decoupler's effect)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per setting (CIs are over seeds)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (at 200 the baseline already "
                        "couples: 33%% leak at 77%% fidelity on validation seeds 100-102; longer runs couple more)")
    parser.add_argument("--images", type=int, default=2, help="images per evaluation prompt")
    parser.add_argument("--sample-steps", type=int, default=15, help="DDIM steps per image")
    parser.add_argument("--weights", help="lab weights folder (default: the shipped one)")
    parser.add_argument("--task", help=f"task YAML file, or a shipped task's name (default: {DEMO_TASK}; "
                        "docs/lab.md)")
    add_jobs_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _verdict(results: list[dict]) -> str:
    """Say plainly whether the decoupler changed the leak rate, with the paired interval over seeds."""
    from ..lab.protocol import relative_change
    from ..lab.report import per_seed, summarize

    rows = {r["regularizer"]: r for r in summarize(results)}
    (a, ha), (b, hb) = rows["none"]["leak"], rows[DECOUPLER]["leak"]
    fa, fb = rows["none"]["fidelity"][0], rows[DECOUPLER]["fidelity"][0]
    seeds = {reg: {r["setting"]["seed"]: per_seed(r)["leak"] for r in results if r["setting"]["regularizer"] == reg}
             for reg in ("none", DECOUPLER)}
    rel, low, high, n = relative_change(seeds["none"], seeds[DECOUPLER])
    head = (f"Leak rate {100 * a:.1f} ± {100 * ha:.1f}% without and {100 * b:.1f} ± {100 * hb:.1f}% with the "
            f"decoupler (fidelity {100 * fa:.0f}% and {100 * fb:.0f}%). ")
    if n < 2 or rel != rel:
        return head + "One seed, or no leak without it: no interval on the change."
    change = f"Relative change {100 * rel:+.0f}% [95% {100 * low:+.0f}, {100 * high:+.0f}] over {n} paired seeds: "
    if high < 0:
        return head + change + "the decoupler <b>lowered</b> the leak beyond the seed-to-seed spread."
    if low > 0:
        return head + change + "the decoupler <b>raised</b> the leak."
    return head + change + "no change beyond the seed-to-seed spread in this run."


def run(args) -> int:
    from ..errors import AccordError
    from ..lab.experiment import run_experiment
    from ..lab.report import format_table, summarize
    from ..lab.runner import DD_WEIGHT, METHODS, Setting
    from ..lab.task import load_task

    task = load_task(args.task or DEMO_TASK)
    seeds = task_seeds(task, args.seeds)
    if args.steps < 2:
        raise AccordError(f"--steps {args.steps}: give at least 2 training steps")
    settings = [Setting(method=args.method, regularizer=reg, seed=seed, steps=args.steps,
                        images_per_prompt=args.images, sample_steps=args.sample_steps, checkpoints=2, task=task)
                for seed in seeds for reg in ("none", DECOUPLER)]
    leak = task.leak.description or f"the task's coupled concept is detected ({task.leak.kind})"
    lora = METHODS["lora"]["method"]
    what = (f"LoRA (rank {lora['lora_rank']}, convolutions rank {lora.get('lora_conv_rank', 0)})"
            if args.method == "lora" else "DreamBooth")
    intro = (f"{what}, {args.steps} steps, on the lab model, without and with DDLoss's conditional form "
             f"(accord.dd_variant: conditional, weight {DD_WEIGHT}), {args.seeds} seed(s), {args.images} images per "
             f"prompt. Leak rate: {leak}. 95% intervals over seeds.")
    results, report, seconds = run_experiment(settings, Path(args.output), title="accord demo: concept coupling",
                                              intro=intro, notes=_verdict, weights=args.weights,
                                              progress=not args.no_progress, jobs=jobs(args))
    print(format_table(summarize(results)))
    print("\n" + _verdict(results).replace("<b>", "").replace("</b>", ""))
    print(f"\nreport: {report}  ({seconds / 60:.1f} min)")
    return 0
