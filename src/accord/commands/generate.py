"""``accord generate MODEL --prompt ...``: images from a base model or a trained output (see :mod:`accord.generate`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import AccordError


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a run's output folder (or checkpoints/step-N), a diffusers folder, or a hub id")
    parser.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    parser.add_argument("--prompts-file", help="text file, one prompt per line")
    parser.add_argument("--output", default="accord-samples", help="folder for the PNGs and grid.png")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=50, help="inference steps (paper: DDIM 50)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (paper: 7.5)")
    parser.add_argument("--scheduler", choices=("ddim", "model"), default="ddim",
                        help="DDIM, or the model's own scheduler")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")


def run(args) -> int:
    from ..generate import generate

    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise AccordError(f"--prompts-file {path} not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    written = generate(args.model, prompts, Path(args.output), num_images=args.num_images, steps=args.steps,
                       guidance=args.guidance, seed=args.seed, height=args.height, width=args.width,
                       scheduler=args.scheduler, device=args.device)
    print(f"wrote {len(written)} images and grid.png to {args.output}")
    return 0
