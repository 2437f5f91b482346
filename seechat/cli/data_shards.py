"""`seechat data shards TABLE OUT`: image–text pairs into webdataset shards (seechat.data.shards).

Exit codes: 0 done (unreadable images are counted in the stats, not errors), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seechat.cli._units import add_shard_limits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert a local table of image–text pairs (TSV, CSV or JSONL) into webdataset tar shards in "
        "the img2dataset layout (KEY.jpg / KEY.txt / KEY.json, 00000.tar …, stats.json). Images are "
        "re-encoded as JPEG and optionally shrunk; unreadable images are counted and listed in the "
        "stats, not fatal. Image URLs are refused: this tool never downloads (use img2dataset)."
    )
    parser.add_argument("input", type=Path, help="pairs table: .tsv, .csv or .jsonl")
    parser.add_argument("output", type=Path, help="directory for the shards")
    parser.add_argument(
        "--image-column", default="image", help="column with the local image path (default: image)"
    )
    parser.add_argument(
        "--caption-column", default="caption", help="column with the caption (default: caption)"
    )
    parser.add_argument("--key-column", default=None, help="column with sample keys (default: running index)")
    parser.add_argument(
        "--image-root",
        type=Path,
        default=None,
        help="directory relative image paths start from (default: the table's)",
    )
    parser.add_argument(
        "--resize", type=int, default=None, help="shrink so the shorter side is this many pixels"
    )
    parser.add_argument(
        "--max-side", type=int, default=None, help="shrink so the longer side is at most this"
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default: 90)")
    add_shard_limits(parser)
    parser.add_argument("--prefix", default="", help="shard file name prefix, e.g. 'train-'")
    parser.add_argument(
        "--workers", type=int, default=0, help="processes that decode/re-encode images (default: 0 = inline)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards already in the output directory"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from seechat.data.shards import ShardInputError, read_pair_table, write_pair_shards

    records = read_pair_table(
        args.input,
        image_column=args.image_column,
        caption_column=args.caption_column,
        key_column=args.key_column,
        image_root=args.image_root,
    )
    try:
        stats = write_pair_shards(
            records,
            args.output,
            image_size=args.resize,
            max_side=args.max_side,
            quality=args.quality,
            max_samples_per_shard=args.samples_per_shard,
            max_bytes_per_shard=args.max_shard_size,
            prefix=args.prefix,
            num_workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ShardInputError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {stats.samples} samples in {len(stats.shards)} shards ({stats.bytes / 2**20:.1f} MiB) "
        f"to {args.output}; {stats.failures} unreadable images "
        f"(see {args.output / (args.prefix + 'stats.json')})"
    )
    return 0
