"""``accord train CONFIG.yaml [--set section.key=value ...] [--resume latest]``."""

from __future__ import annotations

import argparse
import logging

from ..config import describe_keys, load_config
from ..errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "config keys (section.key: default [choices]):\n" + describe_keys()
    parser.add_argument("config", nargs="?", help="YAML config (see examples/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set accord.dd_weight=0.2 (repeatable)")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="'latest' or a checkpoints/step-N folder of output_dir")
    parser.add_argument("--resume-anyway", action="store_true",
                        help="resume even though the reference images changed since the checkpoint (they are named)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..train import train

    if args.config is None and not args.overrides:
        print("accord train: give a CONFIG.yaml (see examples/) or --set keys; --help lists every key")
        return 2
    config = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.resume_anyway and args.resume is None:
        raise ConfigError("--resume-anyway goes with --resume latest (or a checkpoints/step-N folder)")
    out = train(config, resume=args.resume, progress=not args.no_progress, resume_anyway=args.resume_anyway)
    print(f"done: weights and config in {out}")
    return 0
