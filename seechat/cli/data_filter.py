"""`seechat data filter SHARDS... OUT --model CLIP`: keep pairs by Chinese-CLIP score (seechat.data.filter).

Exit codes: 0 done (corrupt samples are counted and listed, not errors), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seechat.cli._units import add_shard_limits, byte_size, fraction


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Score every (image, caption) pair of webdataset shards (img2dataset layout: KEY.jpg / KEY.txt / "
        "KEY.json) with a Chinese-CLIP model — cosine similarity of image and caption embeddings, in "
        "[-1, 1] — and write the pairs that pass as new size-balanced shards in the same layout: keys, "
        "captions and metadata unchanged, the score added to each json as clip_score. Give exactly one "
        "of --threshold or --top-fraction. OUTPUT is written atomically and also gets scores.jsonl "
        "(every sample's score and kept flag), filter_stats.json (counts, threshold used, score "
        "quantiles, corrupt samples by key), score_histogram.png and the shard writer's stats.json. "
        "Corrupt or unreadable samples are counted and listed, never fatal."
    )
    parser.add_argument(
        "shards",
        nargs="+",
        help="input shards: paths, globs or brace patterns, e.g. 'data/{00000..00099}.tar'",
    )
    parser.add_argument(
        "output", type=Path, help="directory for the filtered shards and reports (must not exist)"
    )
    parser.add_argument(
        "--model",
        required=True,
        help="Chinese-CLIP checkpoint: a local directory or hub id of a transformers ChineseCLIPModel "
        "with its tokenizer and image processor, e.g. OFA-Sys/chinese-clip-vit-base-patch16",
    )
    keep = parser.add_mutually_exclusive_group(required=True)
    keep.add_argument("--threshold", type=float, help="keep pairs whose score is >= this cosine, e.g. 0.25")
    keep.add_argument(
        "--top-fraction",
        type=fraction,
        help="keep the round(F x scored pairs) best-scoring pairs, F in (0, 1], e.g. 0.5; ties are broken "
        "by input order and the lowest kept score is reported as the threshold",
    )
    parser.add_argument(
        "--text-field",
        default="txt",
        help="caption to score: 'txt' (the .txt member) or 'json:<field>' (a field of the .json), "
        "like data.text_field in a training config (default: txt)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="pairs per scorer forward pass (default: 64)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="DataLoader processes that read and decode shards, whole shards each (default: 0 = inline)",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device of the scorer, e.g. cuda (default: cpu)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="scorer weights dtype (default: float32)",
    )
    add_shard_limits(parser, "output shard")
    parser.add_argument(
        "--max-sample-size",
        type=byte_size,
        default="64M",
        help="an input sample whose tar members together are larger is listed as corrupt without being read, "
        "so a hostile shard (a gzip bomb) cannot exhaust memory (default: 64M)",
    )
    parser.add_argument("--prefix", default="", help="output shard file name prefix, e.g. 'train-'")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import torch

    from seechat.data.filter import STATS_FILE, KeepRule, filter_shards
    from seechat.data.scorer import ChineseClipScorer

    try:
        rule = KeepRule(threshold=args.threshold, top_fraction=args.top_fraction)
        if args.batch_size < 1 or args.workers < 0:
            raise ValueError("--batch-size must be >= 1 and --workers >= 0")
        if args.text_field != "txt" and not args.text_field.startswith("json:"):
            raise ValueError(f"--text-field must be 'txt' or 'json:<field>', got {args.text_field!r}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scorer = ChineseClipScorer.from_pretrained(
        args.model, device=args.device, dtype=getattr(torch, args.dtype), batch_size=args.batch_size
    )
    try:
        report = filter_shards(
            args.shards,
            args.output,
            scorer,
            rule,
            text_field=args.text_field,
            max_samples_per_shard=args.samples_per_shard,
            max_bytes_per_shard=args.max_shard_size,
            prefix=args.prefix,
            num_workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            max_sample_bytes=args.max_sample_size,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cut = "none kept" if report.threshold is None else f"threshold {report.threshold:.4f}"
    print(
        f"kept {report.n_kept} of {report.n_scored} scored pairs ({cut}) in {report.shards_out} shards; "
        f"{report.n_corrupt} corrupt samples skipped; see {args.output / STATS_FILE}"
    )
    return 0
