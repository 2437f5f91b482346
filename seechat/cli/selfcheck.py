"""`seechat selfcheck`: tiny random real architectures, end to end (seechat.selfcheck)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bridge", default="qformer", help="bridge to stitch with (default: qformer)")


def run(args: argparse.Namespace) -> int:
    from seechat.selfcheck import selfcheck

    r = selfcheck(args.bridge)
    print(f"built {r.bridge} bridge: {r.image_tokens} tokens per image; one training step, loss {r.loss:.3f}")
    print(f"saved and reloaded {r.checkpoint}: {r.checkpoint_files}")
    print(f"用户：图里有什么？\n助手（随机权重）：{r.reply!r}")
    print(f"selfcheck passed in {r.seconds:.1f} s")
    return 0
