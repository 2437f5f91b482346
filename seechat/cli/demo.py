"""`seechat demo`: the whole pipeline on the mini world (seechat.mini.demo), and what it printed."""

from __future__ import annotations

import argparse
from pathlib import Path

from seechat.cli._progress import show_progress
from seechat.mini import demo as mini_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = mini_demo.__doc__.split("\n\n")[0] + " Re-running reuses finished steps."
    parser.add_argument("--out", default="runs/mini", help="where the whole run goes (default: runs/mini)")
    parser.add_argument(
        "--redo",
        nargs="*",
        default=[],
        choices=mini_demo.STEPS,
        metavar="STEP",
        help=f"steps to redo even if finished: {', '.join(mini_demo.STEPS)}",
    )
    parser.add_argument(
        "--bridge",
        choices=["linear", "mlp2x_gelu", "qformer", "resampler"],
        default=None,
        help="bridge for stages 1 and 2 (default: the recipe's, mlp2x_gelu)",
    )
    parser.add_argument(
        "--experts",
        default=None,
        metavar="DIR",
        help="start from the experts of `seechat mini experts --out DIR` instead of the shipped ones",
    )
    small = parser.add_argument_group("a smaller run (smoke tests; the numbers then mean little)")
    small.add_argument(
        "--scenes",
        nargs=3,
        type=int,
        default=None,
        metavar=("TRAIN", "VAL", "TEST"),
        help="scenes per split of the world (default: the world's 6000 300 1000)",
    )
    for stage in ("stage1", "stage2"):
        small.add_argument(
            f"--{stage}",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help=f"more overrides of the {stage} recipe, e.g. train.max_steps=5",
        )
    small.add_argument(
        "--eval-limit", type=int, default=0, metavar="N", help="evaluate the first N test rows (default: all)"
    )


def run(args: argparse.Namespace) -> int:
    from seechat.mini.experts import ExpertPaths
    from seechat.mini.world import WorldConfig

    show_progress(mini_demo.__name__)
    out = Path(args.out)
    experts = ExpertPaths.of(args.experts) if args.experts else None
    world = None
    if args.scenes:
        n_train, n_val, n_test = args.scenes
        world = WorldConfig(n_train=n_train, n_val=n_val, n_test=n_test)
    results = mini_demo.demo(
        out,
        tuple(args.redo),
        args.bridge,
        experts,
        world_cfg=world,
        stage_extra={"stage1": args.stage1, "stage2": args.stage2},
        eval_limit=args.eval_limit,
    )

    print("\n示例对话（测试集图片 " + results["sample_dialogue_image"] + "）：")
    for turn in results["sample_dialogue"]:
        mark = "✓" if turn["right"] else "✗"
        print(
            f"  用户：{turn['user']}\n  助手：{turn['assistant']}\n        {mark} 实际：{turn['reference']}"
        )
    print(
        f"\nVQA accuracy {results['vqa_accuracy']:.1%} over {results['vqa_questions']} questions; "
        f"by type: " + ", ".join(f"{k} {v:.0%}" for k, v in sorted(results["vqa_accuracy_by_type"].items()))
    )
    print(
        f"blind control (the same questions about a blank image): {results['vqa_accuracy_blind']:.1%}; "
        f"by type: "
        + ", ".join(f"{k} {v:.0%}" for k, v in sorted(results["vqa_accuracy_blind_by_type"].items()))
    )
    print(
        f"grounding Acc@0.5 {results['grounding_acc_at_0.5']:.1%}; "
        f"detection mAP@0.5 {results['detection_map_at_0.5']:.1%}; "
        f"caption exact {results['caption_exact_match']:.1%}, "
        f"CIDEr-D {results['caption_cider_d']:.2f}, "
        f"win rate vs alt-text {results['caption_winrate_vs_alt_text']:.1%}"
    )
    print(
        f"checkpoint: {results['checkpoint']}   results: {out / 'results.json'}   "
        f"wall: {results['wall_seconds']:.0f} s"
    )
    return 0
