"""`seechat experiment fusion`: shallow (LM full / frozen / LoRA) vs deep fusion on the mini world,
and what each costs the LM's own text skills (seechat.mini.fusion_experiment)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from seechat.cli._experiment import add_experiment_arguments, experiment_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from seechat.mini import fusion_experiment

    add_experiment_arguments(parser)
    parser.description = fusion_experiment.__doc__.split("\n\n")[0]
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="stage-2 seeds, each a full set of four models"
    )
    parser.add_argument(
        "--stage1",
        type=Path,
        default=None,
        help="start from this finished stage-1 checkpoint (e.g. the demo's runs/mini/stage1) "
        "instead of training one",
    )
    parser.add_argument(
        "--stage2-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for every stage-2 run, e.g. train.max_steps=40 "
        "(repeatable; the same for every mode)",
    )
    parser.add_argument(
        "--text-limit", type=int, default=100, help="val scenes in the text-only reading exam (0 = all)"
    )


def run(args: argparse.Namespace) -> int:
    from seechat.mini.fusion_experiment import fusion_experiment, report

    opts, out = experiment_options(args, "fusion")
    opts = replace(opts, stage_extra=(*opts.stage_extra, ("stage2", tuple(args.stage2_override))))
    res = fusion_experiment(opts, out, tuple(args.seeds), args.text_limit, args.stage1)
    print(report(res))
    return 0
