"""``accord eval``: generate images for a benchmark, score them, and write CSV + HTML reports.

With ``--best-step CRITERION`` it instead evaluates every ``checkpoints/step-*`` of a training run
and picks the best (see :mod:`accord.eval.best_step`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError

BENCHMARKS = ("dreambench", "stylebench", "generic")
DEFAULT_METRICS = {
    "dreambench": "clip_t,clip_i,dino_i,blip_t",
    "stylebench": "clip_t,blip_t,gram_d",
    "generic": "clip_t,clip_i,dino_i,blip_t",
}
DTYPES = ("float32", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("what to evaluate (one of)")
    src.add_argument("--model",
                     help="diffusers pipeline folder, hub id, or trained output folder (config.yaml + adapter files)")
    src.add_argument("--images",
                     help="folder of already generated images with a manifest.csv (file,prompt[,subject,category])")
    src.add_argument("--base-model",
                     help="base pipeline of a trained output (default: model.pretrained in its config.yaml)")

    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark", choices=BENCHMARKS, default="dreambench",
                       help="prompt set and default metrics (default: %(default)s)")
    bench.add_argument("--data", required=True,
                       help="DreamBench folder, StyleBench-style folder of style folders, or a reference folder")
    bench.add_argument("--prompts", help="prompt file, one per line ({0}/{trigger} = token, {1}/{class_noun} = class); "
                       "stylebench/generic")
    bench.add_argument("--subjects", help="comma-separated subjects or styles (default: all found under --data)")
    bench.add_argument("--max-prompts", type=int, help="use only the first N prompts of each subject")
    bench.add_argument("--token",
                       help="trigger token in the prompts (default: data.trigger of a trained output, else 'sks')")
    bench.add_argument("--class-name", default="", help="class noun for generic prompts ({1})")

    gen = parser.add_argument_group("generation (paper Appendix N defaults)")
    gen.add_argument("--num-images", type=int, default=4, help="images per prompt (default: %(default)s)")
    gen.add_argument("--steps", type=int, default=50, help="sampling steps (default: %(default)s)")
    gen.add_argument("--guidance", type=float, default=7.5,
                     help="classifier-free guidance scale (default: %(default)s)")
    gen.add_argument("--scheduler", choices=("ddim", "default"), default="ddim",
                     help="ddim, or the model's own (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0, help="image k of every prompt uses seed+k (default: %(default)s)")
    gen.add_argument("--resolution", type=int, help="image size in pixels (default: the model's)")
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="pipeline dtype (default: %(default)s)")

    met = parser.add_argument_group("metrics and their models")
    met.add_argument("--metrics",
                     help="comma-separated: clip_t,clip_i,dino_i,blip_t,gram_d,face_sim (default: per benchmark)")
    met.add_argument("--clip-model", default="ViT-B-32",
                     help="open_clip architecture, hf-hub: id or local folder (default: %(default)s)")
    met.add_argument("--clip-pretrained", default="openai",
                     help="open_clip pretrained tag or weights file (default: %(default)s)")
    met.add_argument("--dino-model", default="vit_small_patch16_224.dino",
                     help="timm name, transformers id or local folder (default: %(default)s)")
    met.add_argument("--blip-model", default="Salesforce/blip-itm-base-coco",
                     help="BLIP retrieval hub id or local folder (default: %(default)s)")
    met.add_argument("--vgg-weights", default="IMAGENET1K_V1",
                     help="torchvision VGG19 weights name or local state-dict file (default: %(default)s)")
    met.add_argument("--gram-scale", type=float, default=1e6, help="Gram-D multiplier (default: %(default)g)")
    met.add_argument("--face-model", default="buffalo_l", help="insightface model pack (default: %(default)s)")
    met.add_argument("--face-root", help="folder holding insightface models/<pack> (default: ~/.insightface)")
    met.add_argument("--reference-masks",
                     help="folder of subject masks for the references (DIR/<subject>/<stem>.png or DIR/<stem>.png)")
    met.add_argument("--segmenter",
                     help="subject segmenter 'package.module:function' (image -> mask), applied before CLIP-I/DINO-I")
    met.add_argument("--batch-size", type=int, default=16, help="metric batch size (default: %(default)s)")

    parser.add_argument("--best-step", metavar="CRITERION",
                        help="evaluate OUTPUT/checkpoints/step-* of --model and pick the best: "
                             "a metric name or a weighted sum such as '0.5*clip_t+0.5*dino_i'")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _prompts(args, token: str):
    from ..eval.benchmarks import dreambench_prompts, folder_prompts, stylebench_prompts

    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    if args.benchmark == "dreambench":
        return dreambench_prompts(args.data, subjects, token, args.max_prompts)
    if not args.prompts:
        raise ConfigError(f"--benchmark {args.benchmark} needs --prompts FILE (one prompt per line)")
    if args.benchmark == "stylebench":
        return stylebench_prompts(args.data, args.prompts, subjects, token, args.max_prompts)
    return folder_prompts(args.data, args.prompts, token, args.class_name, args.max_prompts)


def _token(args) -> str:
    if args.token:
        return args.token
    if args.model and Path(args.model).is_dir():
        from ..inference import read_run_config

        trigger = (read_run_config(args.model).get("data") or {}).get("trigger")
        if trigger:
            return str(trigger)
    return "sks"


def _metric_settings(args, device: str):
    from ..eval.harness import MetricSettings
    from ..eval.images import load_segmenter

    return MetricSettings(
        clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained or None,
        dino_model=args.dino_model,
        blip_model=args.blip_model,
        vgg_weights=args.vgg_weights,
        face_model=args.face_model,
        face_root=args.face_root,
        gram_scale=args.gram_scale,
        segmenter=load_segmenter(args.segmenter) if args.segmenter else None,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
    )


def _check(args) -> None:
    if bool(args.model) == bool(args.images):
        raise ConfigError("give exactly one of --model (to generate) or --images (already generated)")
    if args.best_step and not args.model:
        raise ConfigError("--best-step needs --model pointing at a training output folder (with checkpoints/)")
    for name in ("num_images", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.harness import build_metrics, generate_rows, parse_metric_names, read_manifest, score_rows, summarize
    from ..eval.report import write_report

    _check(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = parse_metric_names(args.metrics or DEFAULT_METRICS[args.benchmark])
    prompts = _prompts(args, _token(args))
    settings = _metric_settings(args, device)
    out = Path(args.out)
    gen = {"num_images": args.num_images, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
           "resolution": args.resolution, "progress": not args.no_progress}
    dtype = getattr(torch, args.dtype)

    if args.best_step:
        from ..eval.best_step import select_best_step

        result = select_best_step(args.model, prompts, names, args.best_step, out, settings, gen,
                                  base_model=args.base_model, device=device, dtype=dtype, scheduler=args.scheduler,
                                  reference_masks=args.reference_masks)
        print(f"best step {result['best_step']} ({result['criterion']} = {result['best_score']:.4g}); "
              f"wrote {out / 'best_step.json'}")
        return 0

    metrics = build_metrics(names, settings)  # load (and fail on) the metric models before generating
    if args.model:
        from ..eval.pipelines import load_pipeline

        pipe = load_pipeline(args.model, device=device, dtype=dtype, base_model=args.base_model,
                             scheduler=args.scheduler)
        images_dir = out / "images"
        rows = generate_rows(pipe, prompts, images_dir, **gen)
        del pipe
    else:
        images_dir = Path(args.images)
        rows = read_manifest(images_dir, prompts)
    score_rows(rows, images_dir, prompts, metrics, args.reference_masks)
    summary = summarize(rows, names)
    record = {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)}
    paths = write_report(out, rows, summary, names, images_dir, title=f"accord eval: {args.model or args.images}",
                         settings=record)
    (out / "settings.json").write_text(json.dumps(record, indent=2, default=str))
    overall = next(e for e in summary if e["group"] == "overall")
    print("  ".join(f"{m}={overall[m]:.4g}" for m in names) + f"  ({len(rows)} images)  report: {paths['html']}")
    return 0
