"""Argument parsers and entry points for ``seechat data shards|convert|translate|filter``.

Each verb is an ``add_*_arguments(parser)`` / ``run_*(args) -> exit code`` pair that ``seechat/cli.py``
wires into its sub-command tree. This module only parses arguments and reports; the work is done by
:mod:`seechat.data.shards`, :mod:`seechat.data.instruct`, :mod:`seechat.data.translate` and
:mod:`seechat.data.filter`.
Exit codes: 0 done (unreadable images and flagged translations are reported, not errors), 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def _size(text: str) -> int:
    """'1G', '512M', '64k' or plain bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# -- seechat data shards ----------------------------------------------------------------------------------


def add_shards_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument(
        "--samples-per-shard", type=int, default=10_000, help="max samples per shard (default: 10000)"
    )
    parser.add_argument(
        "--max-shard-size", type=_size, default=1 << 30, help="max bytes per shard, e.g. 512M (default: 1G)"
    )
    parser.add_argument("--prefix", default="", help="shard file name prefix, e.g. 'train-'")
    parser.add_argument(
        "--workers", type=int, default=0, help="processes that decode/re-encode images (default: 0 = inline)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards already in the output directory"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_shards(args: argparse.Namespace) -> int:
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
        f"to {args.output}; {stats.failures} unreadable images (see {args.output / (args.prefix + 'stats.json')})"
    )
    return 0


# -- seechat data convert --------------------------------------------------------------------------------


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert instruction data (LLaVA-Instruct JSON/JSONL, MiniGPT-4 filter_cap.json, or "
        "messages-style JSONL) into seechat's conversation JSONL, validating every record: roles "
        "alternate user/assistant after an optional system message, contents are non-empty, and the "
        "number of <image> markers equals the number of images (a record with images but no marker "
        "gets '<image>\\n' at the start of its first user message). The first bad record stops the "
        "conversion with its file, line/record index and id; no partial output is left."
    )
    parser.add_argument("input", type=Path, help="source file (.json or .jsonl)")
    parser.add_argument("output", type=Path, help="destination .jsonl")
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", "llava", "minigpt4", "messages"],
        help="source format (default: auto-detect)",
    )
    parser.add_argument(
        "--image-root", type=Path, default=None, help="if given, check that every image file exists under it"
    )
    parser.add_argument(
        "--caption-instruction",
        default=None,
        help="MiniGPT-4 only: the user turn for each caption (default: '<image>\\n请详细描述这张图片。')",
    )
    parser.add_argument(
        "--image-template",
        default="{image_id}.jpg",
        help="MiniGPT-4 only: image path of an image_id (default: {image_id}.jpg)",
    )


def run_convert(args: argparse.Namespace) -> int:
    from seechat.data.instruct import (
        DEFAULT_CAPTION_INSTRUCTION,
        ConvertOptions,
        DataFormatError,
        convert_file,
    )

    options = ConvertOptions(
        caption_instruction=args.caption_instruction or DEFAULT_CAPTION_INSTRUCTION,
        image_template=args.image_template,
    )
    try:
        count = convert_file(
            args.input, args.output, args.format, image_root=args.image_root, options=options
        )
    except (DataFormatError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} conversations to {args.output}")
    return 0


# -- seechat data translate ------------------------------------------------------------------------------


def add_translate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Translate seechat conversation JSONL from English to Chinese with a local or hub transformers "
        "model. <image> markers, code, URLs and numbers are protected by placeholders; every translated "
        "line is cached in sqlite, so re-running after an interruption never retranslates. Records whose "
        "placeholders did not survive or whose output has too little Chinese go to a separate flagged file."
    )
    parser.add_argument("input", type=Path, help="conversation JSONL (see `seechat data convert`)")
    parser.add_argument("output", type=Path, help="translated conversation JSONL")
    parser.add_argument(
        "--model",
        required=True,
        help="model path or hub id, e.g. Helsinki-NLP/opus-mt-en-zh (seq2seq) or Qwen/Qwen2.5-7B-Instruct (causal)",
    )
    parser.add_argument(
        "--kind", choices=["seq2seq", "causal"], default="seq2seq", help="model family (default: seq2seq)"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="sqlite cache (default: <output>.cache.sqlite)"
    )
    parser.add_argument(
        "--flagged", type=Path, default=None, help="flagged records (default: <output stem>.flagged.jsonl)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="lines per model call (default: 16)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=512, help="generation limit per line (default: 512)"
    )
    parser.add_argument(
        "--min-cjk-ratio",
        type=float,
        default=0.3,
        help="flag a message whose CJK/(CJK+Latin) ratio is below this (default: 0.3)",
    )
    parser.add_argument(
        "--prompt-template",
        default=None,
        help="causal only: prompt with {text}; default asks for a plain Chinese translation keeping [0]-style placeholders",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the checkpoint's)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_translate(args: argparse.Namespace) -> int:
    from seechat.data.instruct import DataFormatError
    from seechat.data.translate import load_translator, translate_file

    kwargs = {"device": args.device, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens}
    if args.kind == "causal" and args.prompt_template:
        kwargs["prompt_template"] = args.prompt_template
    translator = load_translator(args.kind, args.model, **kwargs)
    cache = args.cache or args.output.with_name(args.output.name + ".cache.sqlite")
    try:
        stats = translate_file(
            args.input,
            args.output,
            translator,
            cache_path=cache,
            flagged_path=args.flagged,
            batch_size=args.batch_size,
            min_cjk_ratio=args.min_cjk_ratio,
            progress=not args.no_progress,
        )
    except (DataFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{stats.records} conversations: {stats.written} written to {args.output}, {stats.flagged} flagged; "
        f"{stats.lines_translated} lines translated in {stats.model_calls} model calls, {stats.cache_hits} from cache"
    )
    return 0


# -- seechat data filter ---------------------------------------------------------------------------------


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
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
        type=_fraction,
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
    parser.add_argument(
        "--samples-per-shard", type=int, default=10_000, help="max samples per output shard (default: 10000)"
    )
    parser.add_argument(
        "--max-shard-size",
        type=_size,
        default=1 << 30,
        help="max bytes per output shard, e.g. 512M (default: 1G)",
    )
    parser.add_argument(
        "--max-sample-size",
        type=_size,
        default="64M",
        help="an input sample whose tar members together are larger is listed as corrupt without being read, "
        "so a hostile shard (a gzip bomb) cannot exhaust memory (default: 64M)",
    )
    parser.add_argument("--prefix", default="", help="output shard file name prefix, e.g. 'train-'")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_filter(args: argparse.Namespace) -> int:
    import torch

    from seechat.data.filter import STATS_FILE, KeepRule, filter_shards
    from seechat.eval.scorer import ChineseClipScorer

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
