"""`seechat eval caption --model CKPT --data FILE --out DIR`: a checkpoint on a caption set: CIDEr-D,
BLEU-4, exact match."""

from __future__ import annotations

import argparse

from seechat.cli._eval_task import add_task_arguments, run_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser, "caption")


def run(args: argparse.Namespace) -> int:
    return run_task(args)
