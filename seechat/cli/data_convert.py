"""`seechat data convert SRC OUT.jsonl`: LLaVA / MiniGPT-4 / messages data into seechat conversations
(seechat.data.instruct). Exit codes: 0 done, 2 bad input (the first bad record, named).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
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
