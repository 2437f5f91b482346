"""`seechat data translate SRC OUT.jsonl --model M`: conversations EN->ZH (seechat.data.translate).

Exit codes: 0 done (flagged translations are written apart, not errors), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
        help=(
            "model path or hub id, e.g. Helsinki-NLP/opus-mt-en-zh (seq2seq) or "
            "Qwen/Qwen2.5-7B-Instruct (causal)"
        ),
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
        help=(
            "causal only: prompt with {text}; default asks for a plain Chinese translation keeping "
            "[0]-style placeholders"
        ),
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the checkpoint's)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
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
        f"{stats.lines_translated} lines translated in {stats.model_calls} model calls, "
        f"{stats.cache_hits} from cache"
    )
    return 0
