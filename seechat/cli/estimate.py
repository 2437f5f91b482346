"""`seechat estimate RECIPE.yaml --gpus N`: per-GPU memory and wall time (seechat.estimate)."""

from __future__ import annotations

import argparse

from seechat.estimate import GPUS, STRATEGIES, Setup, estimate, render


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Per-GPU memory (weights, gradients, optimizer states, activations) and wall time "
        "of a recipe, e.g. `seechat estimate configs/reference/stage1_qformer_qwen2.5-7b.yaml "
        "--gpus 8 --gpu h100 --strategy ddp`. Every assumption is printed."
    )
    parser.add_argument("config", help="a YAML recipe (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. train.gradient_checkpointing=true"
    )
    parser.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU kind (default h100)")
    parser.add_argument(
        "--strategy", choices=STRATEGIES, default="ddp", help="data-parallel strategy (default ddp)"
    )
    parser.add_argument(
        "--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed (default 0.4)"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="training samples per epoch (default: 23M pairs, 157,712 conversations)",
    )
    parser.add_argument(
        "--text-tokens",
        type=int,
        default=None,
        help="mean text tokens per sample (default: 64 pairs, 512 conversations)",
    )
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs (default 1)")


def run(args: argparse.Namespace) -> int:
    from seechat.config import load_config

    cfg = load_config(args.config, args.overrides)
    setup = Setup(args.gpus, args.gpu, args.strategy, args.mfu, args.samples, args.text_tokens, args.epochs)
    print(render(estimate(cfg, setup, recipe=str(args.config))))
    return 0
