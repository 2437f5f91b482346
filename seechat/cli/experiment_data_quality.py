"""`seechat experiment data-quality`: stage 1 on N filtered vs N vs 2N noisy pairs
(seechat.mini.experiments)."""

from __future__ import annotations

import argparse

from seechat.cli._experiment import add_experiment_arguments, experiment_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from seechat.mini.experiments import data_quality_experiment

    opts, out = experiment_options(args, "data_quality")
    res = data_quality_experiment(opts, out)
    for name, v in res["variants"].items():
        w2 = res["winrate_stage2"][f"stage2_{name}"]["win_rate"]
        w1 = res["winrate_stage1_only"][f"stage1_{name}"]["win_rate"]
        print(
            f"{name:<12} VQA {v['vqa_accuracy']:.1%}  stage-2 caption win rate {w2:.1%}  "
            f"stage-1-only win rate {w1:.1%}"
        )
    return 0
