"""`seechat merge-lora`: argparse wrapper over `seechat.model.checkpoint.merge_lora`."""

from __future__ import annotations

import argparse
import sys

from seechat.atomic import OutputOverlapError
from seechat.model.checkpoint import merge_lora


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a seechat checkpoint with LoRA adapters")
    parser.add_argument("out", help="where to write the merged checkpoint (full weights, no adapters)")


def run_merge(args: argparse.Namespace) -> int:
    try:
        out = merge_lora(args.checkpoint, args.out)
    except OutputOverlapError as e:
        print(f"seechat merge-lora: {e}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    return 0
