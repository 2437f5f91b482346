"""`seechat eval grounding --model CKPT --data FILE --out DIR`: a checkpoint on a grounding set: Acc@0.5
of <box> answers."""

from __future__ import annotations

import argparse

from seechat.cli._eval_task import add_task_arguments, run_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_task_arguments(parser, "grounding")


def run(args: argparse.Namespace) -> int:
    return run_task(args)
