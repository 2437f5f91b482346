"""`seechat caption --model DIR INPUT... --out FILE.jsonl`: batch captioning (seechat.infer.caption).

INPUT is any mix of folders, `.jsonl` / `.txt` lists, webdataset shards and image files (see
`seechat.infer.caption`); the output rows `{"image": <id>, "caption": <text>}` are a method's
captions file for `seechat eval winrate`. Shows a progress bar; `--resume` skips ids already in
the output file and appends the rest. Images that cannot be read are reported on stderr and left
out (the exit code is then 1).
"""

from __future__ import annotations

import argparse
import logging
import sys

from seechat.cli._sampling import add_sampling_arguments, sampling_from_args
from seechat.infer.caption import DEFAULT_PROMPT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a seechat checkpoint directory")
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="folder, .jsonl or .txt list, webdataset shard(s), or image files",
    )
    parser.add_argument("--out", required=True, help='output JSONL: one {"image", "caption"} row per image')
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"the instruction (default: {DEFAULT_PROMPT})"
    )
    parser.add_argument(
        "--image-root", default=None, help="resolve relative paths of .jsonl/.txt lists against this"
    )
    parser.add_argument("--resume", action="store_true", help="skip ids already in --out and append")
    parser.add_argument("--batch-size", type=int, default=32, help="requests decoded together")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    add_sampling_arguments(parser, max_new_tokens=64)


def run(args: argparse.Namespace) -> int:
    import torch

    from seechat.infer.caption import caption
    from seechat.infer.engine import Engine, EngineConfig
    from seechat.model import load

    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # unreadable images, failed ones

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load(args.model, device=args.device)
    config = EngineConfig(max_batch_size=args.batch_size, max_waiting=4 * args.batch_size, prefix_cache_mb=0)
    try:
        with Engine(model, processor, config) as engine:
            counts = caption(
                engine,
                processor,
                args.inputs,
                args.out,
                args.prompt,
                sampling_from_args(args),
                args.resume,
                args.image_root,
                window=2 * args.batch_size,
                progress=not args.no_progress,
            )
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"seechat caption: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {counts['written']} captions to {args.out}"
        + (f" ({counts['skipped']} already there)" if counts["skipped"] else "")
        + (f"; {counts['failed']} image(s) failed (see above)" if counts["failed"] else "")
    )
    return 1 if counts["failed"] else 0
