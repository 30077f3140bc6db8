"""``accord probe CONFIG``: Eq. 7's terms on the references before any training (see :mod:`accord.probe`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import AccordError


def add_arguments(parser) -> None:
    parser.add_argument("config", help="a training config (YAML), as for accord train")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (repeatable), as for accord train")
    parser.add_argument("--out", help="folder for probe.json and probe.html (default: train.output_dir/probe)")
    parser.add_argument("--timesteps", type=int, default=9, help="timesteps per caption, spread over the grid")
    parser.add_argument("--captions", type=int, help="probe only the first N references (default: all)")


def run(args) -> int:
    from ..config import load_config
    from ..probe import format_table, probe, reading, write

    if args.timesteps < 1:
        raise AccordError(f"--timesteps {args.timesteps}: give at least 1")
    if args.captions is not None and args.captions < 1:
        raise AccordError(f"--captions {args.captions}: give at least 1, or leave it out for all")
    config = load_config(args.config, args.set)
    out = Path(args.out) if args.out else Path(config.train.output_dir) / "probe"
    result = probe(config, num_timesteps=args.timesteps, max_captions=args.captions)
    print(format_table(result))
    for line in reading(result):
        print(line)
    paths = write(result, out)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
