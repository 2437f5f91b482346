"""`seechat export --format llava-hf CKPT OUT`: another framework's layout (seechat.model.export)."""

from __future__ import annotations

import argparse
import sys

from seechat.model.export import FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", choices=FORMATS, default="llava-hf", help="target layout (default: llava-hf)"
    )
    parser.add_argument("model", help="a seechat checkpoint directory")
    parser.add_argument("out", help="directory to write")


def run(args: argparse.Namespace) -> int:
    from seechat.model.export import ExportError, export_llava_hf

    try:
        out = export_llava_hf(args.model, args.out)
    except ExportError as e:
        print(f"seechat export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (transformers LlavaForConditionalGeneration layout)")
    return 0
