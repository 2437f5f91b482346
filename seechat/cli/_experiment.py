"""The options `seechat experiment seed` and `seechat experiment data-quality` share."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from seechat.cli._progress import show_progress
from seechat.mini import experiments


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = experiments.__doc__.split("\n\n")[0]
    parser.add_argument(
        "--run",
        default="runs/mini",
        help="a `seechat demo` run folder holding world/ (default: runs/mini); the world is built "
        "first where missing; the experts are the shipped ones",
    )
    parser.add_argument(
        "--out", default="", help="where the experiment goes (default: <run>/experiments/<name>)"
    )
    parser.add_argument(
        "--limit", type=int, default=0, help="caption only the first N split images (default: all)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data.num_workers for every stage (default: the recipes' 1; shard order depends on it)",
    )


def experiment_options(args: argparse.Namespace, name: str) -> tuple[experiments.Options, Path]:
    """The parsed options as `Options` (the run's world is built first where missing) and the output
    folder."""
    from seechat.mini.demo import Assets
    from seechat.mini.world import WorldConfig, build_world

    show_progress()  # warnings only, as before: the experiments log nothing at INFO a person needs
    run = Path(args.run)
    build_world(run / "world", WorldConfig(), workers=2)
    extra = () if args.workers is None else (f"data.num_workers={args.workers}",)
    opts = experiments.Options(
        Assets.of_run(run),
        limit=args.limit,
        device=args.device,
        n_bootstrap=args.bootstrap,
        stage_extra=(("stage1", extra), ("stage2", extra)),
    )
    return opts, Path(args.out or run / "experiments" / name)
