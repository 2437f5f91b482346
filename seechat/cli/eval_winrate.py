"""`seechat eval winrate`: the caption win-rate experiment (seechat.eval.winrate) from the command line.

Turns the options into a call of :func:`seechat.eval.winrate.run_winrate` and prints a short
summary. Return codes: 0 = report written (problems, if any, are in the report), 2 = unusable
arguments or inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from seechat.eval.winrate import WinRateResult

DEFAULT_SCORER = "runs/mini/experts/clip"  # the mini Chinese-CLIP that the mini world trains
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the win-rate options to ``parser``."""
    parser.epilog = parser.epilog or (
        "Caption win rate: score every method's caption of each held-out image with Chinese-CLIP "
        "(cosine of image and caption); a method wins an image when its caption scores highest. "
        "Ties split the win equally; a missing caption cannot win. Writes report.md, winrate.png, "
        "per_image.csv, problems.csv and summary.json."
    )
    parser.add_argument(
        "--images",
        required=True,
        metavar="SRC",
        help="held-out images: a folder (ids = paths relative to it), a .jsonl list of "
        '{"image": path} (ids = the paths as written), or webdataset shards '
        "(x.tar, 'shards/{00000..00009}.tar' or 'shards/*.tar'; ids = sample keys)",
    )
    parser.add_argument(
        "--image-root",
        type=Path,
        metavar="DIR",
        help="for a .jsonl list: the folder its relative image paths are resolved against "
        "(default: the list's folder; for the mini world, the world root)",
    )
    parser.add_argument(
        "--captions",
        required=True,
        nargs="+",
        metavar="FILE[=METHOD]",
        help='one captions JSONL per method, rows {"image": id, "caption": text}; the method name '
        "is METHOD, or the file name without extension (e.g. out/captions.jsonl=alt_text). "
        "'image' must equal an image id, or be a path ending in one (/data/heldout/a.png matches a.png)",
    )
    parser.add_argument(
        "--scorer",
        default=DEFAULT_SCORER,
        metavar="PATH_OR_HUB_ID",
        help="Chinese-CLIP directory or hub id, e.g. OFA-Sys/chinese-clip-vit-base-patch16 "
        f"(default: {DEFAULT_SCORER}, the mini world's scorer)",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the report files")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="N",
        help="images and texts per forward pass (default: 32)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples of the images for the CI; 0 disables it (default: 1000)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="bootstrap seed (default: 0)")
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device for the scorer; auto = cuda if available (default: auto)",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="scorer dtype (default: float32)"
    )
    return parser


def _parse_caption_spec(spec: str) -> tuple[str, Path]:
    """``"out/a.jsonl=alt_text"`` -> ("alt_text", out/a.jsonl);
    ``"out/alt_text.jsonl"`` -> ("alt_text", ...)."""
    path, sep, method = spec.rpartition("=")
    if not sep or not method or "/" in method or "\\" in method:  # no "=", or "=" belongs to the path
        path, method = spec, Path(spec).stem
    return method, Path(path)


def run(args: argparse.Namespace) -> int:
    """Run the experiment from parsed :func:`add_arguments` options; returns an exit code."""
    from seechat.data.image_sources import open_image_source
    from seechat.data.scorer import ChineseClipScorer
    from seechat.eval.winrate import run_winrate

    try:
        caption_files = _caption_files(args.captions)
        source = open_image_source(args.images, image_root=args.image_root)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.bootstrap < 0:
        print("error: --batch-size must be >= 1 and --bootstrap >= 0", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        scorer = ChineseClipScorer.from_pretrained(
            args.scorer, device=device, dtype=DTYPES[args.dtype], batch_size=args.batch_size
        )
    except OSError as err:  # transformers raises OSError for a missing directory or unreachable hub id
        print(f"error: cannot load the scorer {args.scorer!r}: {err}", file=sys.stderr)
        return 2
    result = run_winrate(
        source.ids,
        source.load,
        caption_files,
        scorer,
        args.out,
        batch_size=args.batch_size,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
    )
    print(_format_summary(result))
    return 0


def _caption_files(specs: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for spec in specs:
        method, path = _parse_caption_spec(spec)
        if method in files:
            raise ValueError(f"method {method!r} given twice (--captions {spec}); name them FILE=METHOD")
        if not path.is_file():
            raise FileNotFoundError(f"captions file {path} does not exist")
        files[method] = path
    return files


def _format_summary(result: WinRateResult) -> str:
    """A few lines for the terminal: win rates with CIs, problem count, where the report is."""
    pct = f"{result.confidence:.0%}"
    lines = [f"caption win rate over {result.n_scored} images (scorer {result.scorer}):"]
    width = max(len(m) for m in result.methods)
    for method, row in result.summary().items():
        lines.append(
            f"  {method:<{width}}  {row['win_rate']:.3f}  "
            f"{pct} CI [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
            f"  mean cosine {row['mean_score']:.3f}"
        )
    if result.problems:
        lines.append(f"{len(result.problems)} input problems: see {result.files['problems']}")
    lines.append(f"report: {result.files['report']}")
    return "\n".join(lines)
