"""What `seechat eval vqa|caption|grounding|detection` share: the options and the run
(seechat.eval.tasks).

The three verbs take the same options (the task picks the epilog, the default prompt, and for
captions `--tokenize`). Return codes: 0 = every row scored, 1 = report written but some rows were
skipped (their images are missing or unreadable: listed in the report), 2 = unusable arguments
or inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seechat.eval.normalize import TOKENIZERS
from seechat.eval.tasks import TASKS

ROWS = {
    "vqa": '{"id", "image", "question", "answer" (or a list of accepted answers), "type" (optional)}',
    "caption": '{"id", "image", "references": [caption, ...]}',
    "grounding": '{"id", "image", "expression", "box": [x1, y1, x2, y2] in the 0-1000 frame}',
    "detection": '{"id", "image", "question", "objects": [{"label", "box": [x1, y1, x2, y2]}, ...]}',
}
METRICS = {
    "vqa": "exact-match accuracy (normalised Chinese answers) overall and per question type",
    "caption": "CIDEr-D, BLEU-4 (coco-caption rules) and exact match against the references",
    "grounding": "Acc@0.5 of the first <box>(x1,y1),(x2,y2)</box> in each answer, mean IoU, parse failures",
    "detection": "mAP@0.5 (VOC all-point AP per class, unscored boxes rank together) and recall per class of "
    "every label<box>(x1,y1),(x2,y2)</box> in each answer",
}


def add_task_arguments(parser: argparse.ArgumentParser, task: str) -> argparse.ArgumentParser:
    parser.set_defaults(task=task)
    parser.epilog = (
        f"Data rows (JSONL): {ROWS[task]}. Metrics: {METRICS[task]}. Writes predictions.jsonl (one row "
        "per data row: id, prompt, prediction, reference and the row's score), report.md and report.json to "
        "--out. Rows whose image is missing or unreadable are skipped, listed by id in the report, and make "
        "the exit code 1. Several processes: torchrun --nproc_per_node N -m seechat.cli eval "
        f"{task} ... (on GPUs also accelerate launch --num_processes N -m seechat.cli eval {task} ...; "
        "on CPUs accelerate launch --cpu starts one process unless MPI is set up, use torchrun); each rank "
        "decodes whole batches of the 1-process run, so the numbers do not depend on the process count."
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="a seechat checkpoint directory")
    parser.add_argument(
        "--data", required=True, type=Path, metavar="FILE", help=f"the {task} eval set (JSONL)"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder for predictions.jsonl, report.md and report.json",
    )
    parser.add_argument(
        "--image-root",
        type=Path,
        metavar="DIR",
        help="folder the rows' relative image paths are resolved against (default: the data "
        "file's folder if the images are there, else the folder above it, e.g. the mini world's "
        "root for world/test/*.jsonl)",
    )
    parser.add_argument(
        "--prompt",
        metavar="TEMPLATE",
        help="prompt template, str.format-ed with the row's fields, with <image> once "
        f"(default: {TASKS[task].prompt!r}{'; {expr} is the expression' if task == 'grounding' else ''})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="prompts decoded together (default: 16)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=TASKS[task].max_new_tokens,
        metavar="N",
        help=f"answer length cap (default: {TASKS[task].max_new_tokens})",
    )
    parser.add_argument(
        "--limit", type=int, default=0, metavar="N", help="only the first N rows (default: all)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device; auto = this process's GPU when there is one, else cpu (default: auto)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, metavar="N", help="torch CPU threads (0 = torch's default)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if task == "caption":
        parser.add_argument(
            "--tokenize",
            default="char",
            choices=sorted(TOKENIZERS),
            help="tokens for CIDEr-D and BLEU: one per Chinese character, or jieba words (default: char)",
        )
    return parser


def run_task(args: argparse.Namespace) -> int:
    """Run the evaluation from parsed options; returns an exit code (see the module docstring)."""
    import torch

    from seechat.eval.tasks import EvalSettings, run_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = EvalSettings(
        task=args.task,
        model=args.model,
        data=args.data,
        out=args.out,
        image_root=args.image_root,
        prompt=args.prompt,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        tokenize=args.tokenize if args.task == "caption" else "char",
        device=args.device,
    )
    try:
        report = run_eval(settings, progress=not args.no_progress)
    except (FileNotFoundError, NotADirectoryError, ValueError, ImportError) as err:  # ImportError: jieba
        print(f"seechat eval {args.task}: {err}", file=sys.stderr)
        return 2
    finally:
        _end_distributed()
    if report is None:  # not rank 0: rank 0 reports
        return 0
    print(_summary(report, args.out))
    return 1 if report["skipped"] else 0


def _end_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _summary(report: dict, out: Path) -> str:
    shown = {k: v for k, v in report["metrics"].items() if isinstance(v, float | int)}
    numbers = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
    lines = [
        f"{report['task']}: {report['scored']} of {report['rows']} rows scored; {numbers or 'no metrics'}"
    ]
    if report["skipped"]:
        ids = ", ".join(str(r["id"]) for r in report["skipped"][:10])
        more = f" and {len(report['skipped']) - 10} more" if len(report["skipped"]) > 10 else ""
        lines.append(f"{len(report['skipped'])} row(s) skipped, image missing or unreadable: {ids}{more}")
    lines.append(f"report: {out / 'report.md'}")
    return "\n".join(lines)
