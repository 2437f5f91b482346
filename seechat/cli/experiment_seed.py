"""`seechat experiment seed`: the 7-method caption win-rate experiment (seechat.mini.experiments)."""

from __future__ import annotations

import argparse

from seechat.cli._experiment import add_experiment_arguments, experiment_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from seechat.mini.experiments import seed_experiment

    opts, out = experiment_options(args, "seed")
    res = seed_experiment(opts, out)
    for m, s in sorted(res["methods"].items(), key=lambda kv: -kv[1]["win_rate"]):
        print(
            f"{m:<20} win rate {s['win_rate']:.1%}  [{s['ci95'][0]:.1%}, {s['ci95'][1]:.1%}]  "
            f"mean score {s['mean_score']:.3f}"
        )
    return 0
