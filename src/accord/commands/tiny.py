"""``accord tiny KIND OUT``: write a tiny random model folder, for offline trials and tests."""

from __future__ import annotations


def add_arguments(parser) -> None:
    from ..testing.tiny import KINDS  # the choices; save_tiny_pipeline is imported only by run

    parser.add_argument("kind", choices=KINDS, help="model family to imitate")
    parser.add_argument("output", help="folder to write (diffusers save_pretrained layout)")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from ..testing.tiny import save_tiny_pipeline

    path = save_tiny_pipeline(args.kind, args.output, seed=args.seed)
    print(f"wrote tiny {args.kind} pipeline to {path}")
    return 0
