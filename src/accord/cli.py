"""The ``accord`` command. Each subcommand lives in its own module and is imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int; see accord.commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("accord.commands.train", "fine-tune a model on a folder of reference photos, with ACCORD's losses"),
    "probe": ("accord.commands.probe",
              "before training: Eq. 7's terms on your references and what each regularizer's gradient would push"),
    "generate": ("accord.commands.generate",
                 "generate images from a base model or a trained output (DDIM 50, CFG 7.5)"),
    "eval": ("accord.commands.eval",
             "generate, score and report a benchmark (CLIP-T/I, DINO-I, BLIP-T, Gram-D, Face-Sim); "
             "--best-step picks a checkpoint"),
    "caption": ("accord.commands.caption",
                "write .txt caption sidecars with a vision-language model or a template"),
    "quickstart": ("accord.commands.quickstart", "offline demo: LoRA + DDLoss for a few steps on a tiny random model"),
    "tiny": ("accord.commands.tiny",
             "write a tiny random model (sd, sd-v, sdxl, flux, sd3) as a local diffusers folder"),
    "demo": ("accord.commands.demo",
             "the coupling lab in minutes on a CPU: LoRA with and without ACCORD, leak rates, report.html"),
    "lab": ("accord.commands.lab", "the synthetic coupling lab: pretrain its miniature models, bench every method"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accord", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"accord {__version__}")
    parser.add_argument("--debug", action="store_true", help="show an error's Python traceback instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:  # a command whose optional dependency is missing
            if exc.name and exc.name.startswith("accord"):
                raise
            p.set_defaults(_missing=str(exc))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"accord {args.command}: {args._missing}", file=sys.stderr)
        return 2
    from .errors import AccordError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (AccordError, OSError) as exc:  # the user's input or machine (a file, a folder, the disk), not a bug
        if args.debug:
            raise
        print(f"accord {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"accord {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}; fix the path or its permissions (accord --debug shows where)"
    else:
        text = str(exc)
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
