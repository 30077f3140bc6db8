"""``accord demo``: LoRA with and without ACCORD's DDLoss on the lab's coupling task, on a CPU in minutes.

The lab model (shipped with accord) is fine-tuned on five references of a red checkered ``sks circle``
that always stands next to a yellow triangle; each run then draws the fixed evaluation prompts, most of
which do not ask for the triangle, and the lab's detector counts how often it appears anyway (the leak
rate), whether the prompt was followed and whether the subject kept its look. The report is
``<output>/report.html``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("--output", default="accord-demo", help="run folder (report.html, samples, results)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per setting (CIs are over seeds)")
    parser.add_argument("--steps", type=int, default=150, help="LoRA training steps per run")
    parser.add_argument("--images", type=int, default=4, help="images per evaluation prompt")
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per image")
    parser.add_argument("--weights", help="lab weights folder (default: the shipped one)")
    parser.add_argument("--task", help="task YAML file, or a shipped task's name (default: object-object; "
                        "docs/lab.md)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _verdict(results: list[dict]) -> str:
    """Say plainly whether DDLoss changed the leak rate beyond the seed-to-seed spread."""
    from ..lab.report import summarize

    rows = {r["regularizer"]: r for r in summarize(results)}
    (a, ha), (b, hb) = rows["none"]["leak"], rows["dd"]["leak"]
    if ha != ha or hb != hb:  # nan: one seed, no interval
        return f"Leak rate {100 * a:.1f}% without and {100 * b:.1f}% with DDLoss; one seed gives no interval."
    if abs(a - b) <= max(ha, hb):
        verdict = "DDLoss did <b>not</b> change the leak rate beyond the seed-to-seed spread in this run."
    else:
        verdict = f"DDLoss {'lowered' if b < a else 'raised'} the leak rate beyond the seed-to-seed spread."
    return (f"Leak rate {100 * a:.1f} ± {100 * ha:.1f}% without and {100 * b:.1f} ± {100 * hb:.1f}% with DDLoss. "
            f"{verdict} The lab model's quality and the measured size of the DD term are in benchmarks/RESULTS.md "
            "(section 'Coupling lab'); read the numbers against them.")


def run(args) -> int:
    from ..errors import AccordError
    from ..lab.experiment import run_experiment
    from ..lab.report import format_table, summarize
    from ..lab.runner import DD_WEIGHT, Setting
    from ..lab.task import default_task, load_task

    task = load_task(args.task) if getattr(args, "task", None) else default_task()
    if not 1 <= args.seeds <= len(task.seeds):
        raise AccordError(f"--seeds {args.seeds}: choose 1 to {len(task.seeds)} (the task's fixed seeds)")
    settings = [Setting(method="lora", regularizer=reg, seed=seed, steps=args.steps, images_per_prompt=args.images,
                        sample_steps=args.sample_steps, checkpoints=2, task=task)
                for seed in task.seeds[:args.seeds] for reg in ("none", "dd")]
    leak = task.leak.description or f"the task's coupled concept is detected ({task.leak.kind})"
    intro = (f"LoRA (rank 32, {args.steps} steps) on the lab model, without and with DDLoss (weight {DD_WEIGHT}), "
             f"{args.seeds} seed(s), {args.images} images per prompt. Leak rate: {leak}. 95% intervals over seeds.")
    results, report, seconds = run_experiment(settings, Path(args.output), title="accord demo: concept coupling",
                                              intro=intro, notes=_verdict, weights=args.weights,
                                              progress=not args.no_progress)
    print(format_table(summarize(results)))
    print(f"\nreport: {report}  ({seconds / 60:.1f} min)")
    return 0
