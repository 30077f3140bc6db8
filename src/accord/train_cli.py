"""``accord train CONFIG.yaml [--set section.key=value ...] [--resume latest]``."""

from __future__ import annotations

import argparse
import logging

from .config import describe_keys, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "config keys (section.key: default [choices]):\n" + describe_keys()
    parser.add_argument("config", nargs="?", help="YAML config (see examples/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set accord.dd_weight=0.2 (repeatable)")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="'latest' or a checkpoints/step-N folder of output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from .train import train

    if args.config is None and not args.overrides:
        print("accord train: give a CONFIG.yaml (see examples/) or --set keys; --help lists every key")
        return 2
    config = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = train(config, resume=args.resume, progress=not args.no_progress)
    print(f"done: weights and config in {out}")
    return 0
