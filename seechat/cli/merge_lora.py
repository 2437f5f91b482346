"""`seechat merge-lora CKPT OUT`: fold LoRA adapters into full weights (seechat.model.checkpoint)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a seechat checkpoint with LoRA adapters")
    parser.add_argument("out", help="where to write the merged checkpoint (full weights, no adapters)")


def run(args: argparse.Namespace) -> int:
    from seechat.atomic import OutputOverlapError
    from seechat.model.checkpoint import merge_lora

    try:
        out = merge_lora(args.checkpoint, args.out)
    except OutputOverlapError as e:
        print(f"seechat merge-lora: {e}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    return 0
