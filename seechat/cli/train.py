"""`seechat train RECIPE.yaml [key=value ...]`: one stage from a YAML recipe (seechat.train.loop)."""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train one stage from a YAML recipe. Overrides are dotted key=value pairs, e.g. "
        "`seechat train seechat/mini/recipes/stage1.yaml train.max_steps=50 optim.lr=5e-4`. "
        "Launch on several GPUs with `accelerate launch -m seechat.cli train ...`."
    )
    parser.add_argument("config", help="a YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    parser.add_argument(
        "--no-resume", action="store_true", help="ignore an existing resume point and start over"
    )


def run(args: argparse.Namespace) -> int:
    from seechat.config import load_config
    from seechat.train.loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    result = train(cfg, resume=not args.no_resume)
    print(
        f"done: {result.steps} steps, final loss {result.final_loss:.4f}, "
        f"{result.wall_seconds:.1f} s -> {result.output_dir}"
    )
    return 0
