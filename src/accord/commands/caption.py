"""``accord caption FOLDER``: write ``.txt`` caption sidecars with a vision-language model or a template (see
:mod:`accord.caption`)."""

from __future__ import annotations

import argparse

from ..caption import APPENDIX_O_PROMPT, DEFAULT_TEMPLATE, DEFAULT_VLM


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="folder of reference images; captions go beside them as <stem>.txt")
    parser.add_argument("--trigger", required=True, help="trigger token, e.g. sks or <new1>")
    parser.add_argument("--class", dest="class_noun", required=True, help="class noun of the subject, e.g. dog")
    parser.add_argument("--model", default=DEFAULT_VLM,
                        help="vision-language model: hub id or local folder (default: %(default)s)")
    parser.add_argument("--prompt", default=APPENDIX_O_PROMPT,
                        help="instruction; {tag} becomes the class noun (default: paper Appendix O)")
    parser.add_argument("--template", nargs="?", const=DEFAULT_TEMPLATE, default=None,
                        help="no model: caption every image with this template "
                             f"(default when given bare: {DEFAULT_TEMPLATE!r})")
    parser.add_argument("--phrase", action="append", default=[], dest="phrases",
                        help="extra phrase appended to each caption (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing .txt captions")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="VLM answer length limit (default: %(default)s)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..caption import VLMCaptioner, caption_folder

    captioner = None
    if args.template is None:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        captioner = VLMCaptioner(args.model, device, max_new_tokens=args.max_new_tokens)
    done = caption_folder(args.folder, args.trigger, args.class_noun, captioner, args.template, args.phrases,
                          args.prompt, args.overwrite, progress=not args.no_progress)
    note = " (existing captions kept; --overwrite replaces them)" if done["skipped"] else ""
    print(f"wrote {len(done['written'])} captions, skipped {len(done['skipped'])}{note}")
    return 0
