"""Run a list of lab settings (resuming finished ones), then write the report: shared by
``accord demo`` and ``accord lab bench``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .report import first_seed_grids, format_table, format_terms, summarize, summarize_terms, write_report
from .runner import Setting, run_setting

__all__ = ["run_experiment", "quiet", "open_bench", "runs_bar", "map_runs", "default_jobs"]


def quiet() -> None:
    """Silence library chatter (load reports, deprecation notes) so the progress bars stay readable."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    logging.getLogger("accord").setLevel(logging.WARNING)


def default_jobs() -> int:
    """Runs at a time by default: one per CPU core this process may use, at most 2 (each run is given one thread;
    past two, the lab's small models gain little and memory grows)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, cores))


_WORKER: dict = {}


def _start_worker(weights) -> None:
    import torch

    torch.set_num_threads(1)
    quiet()
    from .judge import Judge

    _WORKER["judge"] = Judge(weights)


def _in_worker(fn, s, kwargs):
    return fn(s, judge=_WORKER["judge"], **kwargs)


def map_runs(fn, settings: list, judge, *, jobs: int, desc: str, progress: bool, weights=None, **kwargs) -> list:
    """``fn(s, judge=..., **kwargs)`` for every setting, results in the settings' order. ``jobs > 1``: that many
    worker processes, one thread each, each with its own judge; runs are seeded, so a setting gives the same
    numbers whichever worker trains it (up to float summation order across thread counts). Regularized runs are
    handed out first: they cost more (extra predictions per step), and a long run started last would leave the other
    workers idle at the end."""
    if jobs <= 1 or len(settings) <= 1:
        return [fn(s, judge=judge, progress=progress, **kwargs) for s in runs_bar(settings, desc, progress)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    results: list = [None] * len(settings)
    with ProcessPoolExecutor(min(jobs, len(settings)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker, initargs=(weights,)) as pool:
        futures = {pool.submit(_in_worker, fn, settings[i], {**kwargs, "weights": weights, "progress": False}): i
                   for i in longest_first(settings)}
        bar = tqdm(total=len(settings), desc=f"{desc} ({jobs} at a time)", disable=not progress)
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            bar.set_postfix_str(settings[i].name)
            bar.update()
        bar.close()
    return results


def longest_first(settings: list) -> list[int]:
    """The settings' indices in the order runs are handed to workers: regularized runs first, each group in its
    given order."""
    return sorted(range(len(settings)), key=lambda i: settings[i].regularizer == "none")


def _run_or_reuse(s: Setting, judge, root: Path, weights=None, progress: bool = False) -> dict:
    done = root / "runs" / s.name / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if result["setting"]["steps"] == s.steps:
            return result
    return run_setting(s, root, judge, weights=weights, progress=progress)


def run_experiment(settings: list[Setting], folder: Path, *, title: str, intro: str, notes=None,
                   weights: Path | None = None, progress: bool = True,
                   jobs: int = 1) -> tuple[list[dict], Path, float]:
    task, judge, t0 = open_bench(settings, folder, weights)
    results = map_runs(_run_or_reuse, settings, judge, jobs=jobs, desc="lab runs", progress=progress,
                       weights=weights, root=folder)
    grids = first_seed_grids(results, folder, "runs")
    seconds = time.time() - t0
    report = write_report(folder, results, title=title, intro=intro + f" Wall time: {seconds / 60:.1f} min.",
                          grids=grids, notes=notes(results) if callable(notes) else (notes or ""), task=task)
    per_category = "".join(f"\n### {c}\n\n{format_table(summarize(results, c))}\n" for c in task.categories)
    terms = summarize_terms(results)
    terms_md = (f"\n### Eq. 7's terms (nats per element, base → last checkpoint)\n\n{format_terms(terms)}\n"
                if terms else "")
    (folder / "summary.md").write_text(format_table(summarize(results)) + "\n" + per_category + terms_md)
    (folder / "results.json").write_text(json.dumps(results))
    return results, report, seconds


def open_bench(settings: list, folder: Path, weights, pattern: str = "runs/*/result.json", what: str = "runs"):
    """What every bench starts with: quiet libraries, the settings' task (refused if ``folder`` holds another
    task's finished work, matched by ``pattern``), the judge, and the start time."""
    from .judge import Judge

    quiet()
    task = settings[0].task
    _check_folder(folder, task.name, pattern, what, task.protocol_version)
    return task, Judge(weights), time.time()


def runs_bar(settings: list, desc: str, progress: bool):
    """The settings, one progress-bar step each, the current run's name beside the bar."""
    from tqdm.auto import tqdm

    bar = tqdm(settings, desc=desc, disable=not progress)
    for s in bar:
        bar.set_postfix_str(s.name)
        yield s


def _check_folder(folder: Path, name: str, pattern: str = "runs/*/result.json", what: str = "runs",
                  version: int = 1) -> None:
    """A run folder holds one task's runs, of one protocol version of it (finished runs are reused): refuse to mix
    in another task's, or runs made before the task's captions, prompts or leak rule changed (records without a
    version are version 1)."""
    from ..errors import AccordError
    from .task import DEFAULT_TASK

    for done in sorted(folder.glob(pattern)):
        setting = json.loads(done.read_text())["setting"]
        other = setting.get("task", DEFAULT_TASK)
        if other != name:
            raise AccordError(f"{folder} holds {what} of task {other!r} ({done.parent.name}); give task {name!r} "
                              "its own --output folder")
        seen = setting.get("task_version", 1)
        if seen != version:
            raise AccordError(f"{folder} holds {what} of task {name!r} version {seen} "
                              f"({done.parent.name}); the task is now version {version}: give it its own --output "
                              "folder")
