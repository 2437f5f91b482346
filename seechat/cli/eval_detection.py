"""`seechat eval detection --model CKPT --data FILE --out DIR`: a checkpoint on a detection set
(list every object with its box): mAP@0.5 and recall per class."""

from __future__ import annotations

import argparse

from seechat.cli._eval_task import add_task_arguments, run_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser, "detection")


def run(args: argparse.Namespace) -> int:
    return run_task(args)
