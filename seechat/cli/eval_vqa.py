"""`seechat eval vqa --model CKPT --data FILE --out DIR`: a checkpoint on a VQA set: accuracy per
question type."""

from __future__ import annotations

import argparse

from seechat.cli._eval_task import add_task_arguments, run_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser, "vqa")


def run(args: argparse.Namespace) -> int:
    return run_task(args)
