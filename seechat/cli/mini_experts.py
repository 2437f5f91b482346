"""`seechat mini experts`: retrain the shipped mini experts from scratch (seechat.mini.experts)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from seechat.mini.experts import RECIPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train the mini Chinese-CLIP and the mini Chinese LM from scratch on fresh scenes of the mini world, "
        "with the project's recipes (the package ships the result: seechat/mini/weights). Measured: on one "
        "H200 (both at once) the CLIP took 268 s and the LM 223 s; on a 2-core CPU a step takes 0.87 s "
        "(CLIP) and 13.7 s (LM), so about 40 minutes and 11 hours."
    )
    parser.add_argument("--out", default="runs/mini/experts", help="output folder: OUT/clip and OUT/lm")
    parser.add_argument("--only", choices=sorted(RECIPES), help="train one expert only")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="EXPERT.FIELD=VALUE",
        help="change a recipe field, e.g. lm.steps=2000 clip.batch_size=64",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available)",
    )
    parser.add_argument("--workers", type=int, default=4, help="processes that draw and render the batches")
    parser.add_argument("--force", action="store_true", help="retrain even when OUT holds a finished run")
    parser.add_argument(
        "--exam-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="LM: every STEPS steps (a multiple of lm.log_every) read the reading exam of 100 fixed fresh "
        "scenes into metrics.jsonl, to see when reading appears (default: off)",
    )
    parser.add_argument(
        "--evaluate",
        metavar="WORLD",
        help="then evaluate on this world's val split (writes eval.json into each expert's folder)",
    )


def run(args: argparse.Namespace) -> int:
    from seechat.mini.experts import (
        ClipRecipe,
        LMRecipe,
        evaluate_experts,
        recipe_overrides,
        train_mini_clip,
        train_mini_lm,
    )

    try:
        over = recipe_overrides(args.set)
    except ValueError as e:
        print(f"seechat mini experts: {e}", file=sys.stderr)
        return 2
    log_every = LMRecipe(**over["lm"]).log_every
    if args.exam_every < 0 or (args.exam_every and args.exam_every % log_every):
        print(
            f"seechat mini experts: --exam-every {args.exam_every} must be a multiple of lm.log_every "
            f"({log_every})",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    trained: dict[str, Path] = {}
    start = time.time()
    if args.only in (None, "clip"):
        trained["clip"] = train_mini_clip(
            out / "clip",
            ClipRecipe(**over["clip"]),
            force=args.force,
            device=args.device,
            workers=args.workers,
        )
    if args.only in (None, "lm"):
        trained["lm"] = train_mini_lm(
            out / "lm",
            LMRecipe(**over["lm"]),
            force=args.force,
            device=args.device,
            workers=args.workers,
            exam_every=args.exam_every,
        )
    print(f"trained {', '.join(f'{k}: {v}' for k, v in trained.items())} in {time.time() - start:.0f} s")
    if args.evaluate:
        for name, result in evaluate_experts(trained, args.evaluate).items():
            print(f"{name} on {args.evaluate} (val): {json.dumps(result, ensure_ascii=False)}")
    return 0
