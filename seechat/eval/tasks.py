"""Run a checkpoint on an eval set — VQA, captions, grounding or detection — and score it.

What this module is: greedy generation over a JSONL eval set through the serving engine
(``seechat.infer.engine``, the way ``seechat caption`` decodes), split across processes when
launched with several, then the metrics of ``seechat.eval`` over all rows, written as
``predictions.jsonl``, ``report.json`` and ``report.md``. The eval sets are the mini world's test
files (any file with the same fields works):

    vqa        {"id", "image", "question", "answer" (or a list of accepted answers), "type"}
    caption    {"id", "image", "references": [...]}
    grounding  {"id", "image", "expression", "box": [x1, y1, x2, y2] (0-1000 frame)}
    detection  {"id", "image", "question", "objects": [{"label", "box": [x1, y1, x2, y2]}, ...]}

Several processes (``torchrun --nproc_per_node N`` or ``accelerate launch``): the rows are cut into
the batches a 1-process run would make (file order, ``batch_size`` rows each), and each rank takes
a contiguous run of whole batches. The engine decodes every row as it would alone (its greedy
tokens do not depend on the rows decoded beside it), so the predictions and the metrics are the
1-process run's. Each rank writes its
predictions under ``out/.shards/``; after a barrier rank 0 merges them and scores all rows, so
``out`` must be a folder every rank sees (always true on one machine).

Images that are missing or cannot be decoded are not guessed around: their rows are skipped,
listed by id in both reports with the reason, and counted; the metrics are over the scored rows.

What it is not: sampling-based evaluation or the caption win rate (``seechat eval winrate``).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from seechat.data.images import ImageError, load_image_file
from seechat.data.jsonl import read_jsonl, write_jsonl
from seechat.data.processor import SeeChatProcessor
from seechat.eval.bleu import bleu
from seechat.eval.cider import cider_d
from seechat.eval.detection import detection_metrics, parse_detections
from seechat.eval.grounding import grounding_accuracy
from seechat.eval.normalize import get_tokenizer, normalize_caption
from seechat.eval.vqa import vqa_accuracy
from seechat.infer.engine import Engine, EngineConfig
from seechat.infer.request import StreamEvent
from seechat.infer.sampling import SamplingParams
from seechat.model.modeling import SeeChatModel

__all__ = [
    "CAPTION_PROMPT",
    "DETECTION_PROMPT",
    "GROUNDING_PROMPT",
    "TASKS",
    "VQA_PROMPT",
    "EvalSettings",
    "Task",
    "answer_batch",
    "answer_rows",
    "generate_answers",
    "resolve_image_root",
    "run_eval",
    "shard_batches",
]

VQA_PROMPT = "<image>\n{question}"
CAPTION_PROMPT = "<image>\n请用一句话描述这张图片。"
GROUNDING_PROMPT = "<image>\n请给出{expr}的位置（坐标框）。"
DETECTION_PROMPT = "<image>\n{question}"
SHARD_DIR = ".shards"
MAX_LISTED = 50  # skipped rows listed in report.md; report.json lists all of them


# --- generation --------------------------------------------------------------------------------


def generate_answers(
    engine: Engine,
    processor: SeeChatProcessor,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    params: SamplingParams,
) -> list[str]:
    """One answer per (prompt with one <image>, image), in order, decoded by the serving engine
    (the way `seechat caption` decodes; each row is decoded as it would be alone)."""
    done = [threading.Event() for _ in prompts]
    parts: list[list[str]] = [[] for _ in prompts]
    errors: list[str | None] = [None] * len(prompts)

    def sink(k: int) -> Callable[[StreamEvent], None]:
        def on_event(ev: StreamEvent) -> None:
            parts[k].append(ev.text)
            if ev.finish_reason is not None:
                if ev.finish_reason in ("error", "timeout", "abort"):
                    errors[k] = ev.error or ev.finish_reason
                done[k].set()

        return on_event

    for k, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        ids = processor.prompt_ids([{"role": "user", "content": prompt}], 1)
        engine.submit(ids, [image], params, sink=sink(k), cache_prefix=False)
    for k, event in enumerate(done):
        event.wait()
        if errors[k] is not None:
            raise RuntimeError(f"generation failed for prompt {k}: {errors[k]}")
    return ["".join(p).strip() for p in parts]


def answer_batch(
    model: SeeChatModel,
    processor: SeeChatProcessor,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    batch_size: int = 64,
    max_new_tokens: int = 48,
    desc: str = "generate",
) -> list[str]:
    """Greedy one-turn answers, one per (prompt with one <image>, image), submitted to one engine
    `batch_size` at a time (the progress unit; the engine batches them as it sees fit)."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    out: list[str] = []
    with Engine(model, processor, _engine_config(batch_size)) as engine:
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
            out.extend(
                generate_answers(
                    engine, processor, prompts[i : i + batch_size], images[i : i + batch_size], params
                )
            )
    return out


def _engine_config(batch_size: int) -> EngineConfig:
    """Room for a whole batch in the queue; a batch of one image prompt never reuses another's KV."""
    return EngineConfig(max_waiting=max(256, batch_size), prefix_cache_mb=0)


def answer_rows(
    model: SeeChatModel,
    processor: SeeChatProcessor,
    task: Task,
    rows: Sequence[dict],
    images: Mapping[str, Image.Image],
    batch_size: int = 64,
    max_new_tokens: int = 48,
    prompt: str | None = None,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers to eval rows already in memory, one per row: the task's prompt (or `prompt`)
    rendered with each row, about `images[row["image"]]`. The in-process twin of `run_eval`'s
    decoding, for callers that hold their images (the mini demo, its blind control)."""
    prompts = _render_prompts(prompt if prompt is not None else task.prompt, list(rows))
    return answer_batch(
        model, processor, prompts, [images[r["image"]] for r in rows], batch_size, max_new_tokens, desc
    )


def shard_batches(n_rows: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """The batches (row index ranges) rank `rank` of `world_size` decodes: a contiguous run of the
    1-process run's batches, so no batch differs from it. Ranks differ by at most one batch."""
    batches = [range(i, min(i + batch_size, n_rows)) for i in range(0, n_rows, batch_size)]
    per_rank, extra = divmod(len(batches), world_size)
    start = rank * per_rank + min(rank, extra)
    return batches[start : start + per_rank + (rank < extra)]


# --- tasks -------------------------------------------------------------------------------------

Scores = tuple[dict, list[dict]]  # metrics over the scored rows, and per-row fields for predictions.jsonl


def _score_vqa(rows: list[dict], predictions: list[str], tokenize: str) -> Scores:
    res = vqa_accuracy(predictions, [r["answer"] for r in rows], [r.get("type", "untyped") for r in rows])
    metrics = {
        "accuracy": res.accuracy,
        "correct": sum(res.correct),
        "accuracy_by_type": res.per_type,
        "count_by_type": res.type_counts,
    }
    return metrics, [{"correct": ok} for ok in res.correct]


def caption_exact_match(prediction: str, references: Sequence[str]) -> bool:
    """Whether the caption equals one of the references up to width, case, numerals and punctuation."""
    return normalize_caption(prediction) in {normalize_caption(r) for r in references}


def _score_captions(rows: list[dict], predictions: list[str], tokenize: str) -> Scores:
    refs = [r["references"] for r in rows]
    cider = cider_d(predictions, refs, tokenize=tokenize)
    bl = bleu(predictions, refs, tokenize=tokenize)
    exact = [caption_exact_match(p, r) for p, r in zip(predictions, refs, strict=True)]
    metrics = {
        "cider_d": cider.score,
        "bleu_4": bl.score,
        "bleu_1_to_4": bl.bleu_n,
        "exact_match": sum(exact) / len(exact),
    }
    per_row = [
        {"exact_match": e, "cider_d": c, "bleu_4": b}
        for e, c, b in zip(exact, cider.per_image, bl.per_sentence, strict=True)
    ]
    return metrics, per_row


def _score_grounding(rows: list[dict], predictions: list[str], tokenize: str) -> Scores:
    res = grounding_accuracy(predictions, [r["box"] for r in rows], threshold=0.5)
    metrics = {
        "acc_at_0.5": res.accuracy,
        "mean_iou": sum(res.ious) / len(res.ious),
        "parse_failures": res.parsed.count(False),
    }
    per_row = [
        {"iou": iou, "parsed": ok, "correct": iou >= res.threshold}
        for iou, ok in zip(res.ious, res.parsed, strict=True)
    ]
    return metrics, per_row


def score_detection(rows: list[dict], predictions: list[str]) -> Scores:
    """mAP@0.5 and recall per class; a box's label is the last class name of the eval set written
    before it (seechat.eval.detection)."""
    classes = sorted({o["label"] for r in rows for o in r["objects"]})
    parsed = [parse_detections(p, classes) for p in predictions]
    truth = [[(o["label"], tuple(o["box"])) for o in r["objects"]] for r in rows]
    res = detection_metrics(truth, parsed, threshold=0.5)
    metrics = {
        "map_at_0.5": res.map,
        "ap_by_class": res.ap_by_class,
        "recall_by_class": res.recall_by_class,
        "objects_by_class": res.gt_by_class,
        "true_positives": res.true_positives,
        "boxes_predicted": res.predictions,
    }
    return metrics, [{"boxes_parsed": len(p)} for p in parsed]


def _score_detection(rows: list[dict], predictions: list[str], tokenize: str) -> Scores:
    return score_detection(rows, predictions)


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    fields: tuple[str, ...]  # required keys of every row
    prompt: str  # default template, str.format-ed with the row's fields (grounding: also {expr})
    reference: str  # the row key written as "reference" in predictions.jsonl
    score: Callable[[list[dict], list[str], str], Scores]  # (rows, predictions, tokenize)
    max_new_tokens: int = 48  # the default answer length cap


TASKS: dict[str, Task] = {
    "vqa": Task("vqa", "VQA", ("id", "image", "question", "answer"), VQA_PROMPT, "answer", _score_vqa),
    "caption": Task(
        "caption", "Captions", ("id", "image", "references"), CAPTION_PROMPT, "references", _score_captions
    ),
    "grounding": Task(
        "grounding",
        "Grounding",
        ("id", "image", "expression", "box"),
        GROUNDING_PROMPT,
        "box",
        _score_grounding,
    ),
    "detection": Task(
        "detection",
        "Detection",
        ("id", "image", "question", "objects"),
        DETECTION_PROMPT,
        "objects",
        _score_detection,
        max_new_tokens=192,  # four objects with their boxes are ~130 characters
    ),
}


# --- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    task: str  # a key of TASKS
    model: str  # checkpoint directory
    data: Path  # the eval JSONL
    out: Path
    image_root: Path | None = None  # None: see resolve_image_root
    prompt: str | None = None  # None: the task's default template
    batch_size: int = 16
    max_new_tokens: int = 48
    limit: int = 0  # 0 = every row
    tokenize: str = "char"  # caption metrics: "char" or "jieba"
    device: str = "auto"  # auto (or "cuda" with several ranks): this rank's GPU (cuda:<local rank>), else cpu


def resolve_image_root(data: Path, rows: Sequence[dict], image_root: Path | None = None) -> Path:
    """Where relative image paths point: `image_root` when given; else the data file's folder if
    any row's image is found there, else the folder above it (the mini world's layout:
    ``world/test/vqa.jsonl`` names ``images/test/x.jpg`` relative to ``world/``)."""
    if image_root is not None:
        return image_root
    for root in (data.parent, data.parent.parent):
        if any((root / r["image"]).is_file() for r in rows):
            return root
    return data.parent


def _check_rows(task: Task, rows: list[dict], data: Path) -> None:
    for i, row in enumerate(rows, 1):
        missing = [k for k in task.fields if k not in row]
        if missing:
            raise ValueError(
                f"{data} row {i}: missing {', '.join(missing)} "
                f"(a {task.name} row needs {', '.join(task.fields)})"
            )
        bad = _bad_reference(task.name, row)
        if bad:
            raise ValueError(f"{data} row {i}: {bad}")
    dup = [i for i, n in Counter(str(r["id"]) for r in rows).items() if n > 1]
    if dup:
        raise ValueError(
            f"{data}: id {dup[0]!r} appears more than once ({len(dup)} ids repeat); ids must be unique"
        )


def _bad_reference(task: str, row: dict) -> str | None:
    """Why the row's reference cannot be scored, or None (caught before any decoding, not after)."""
    if task == "caption" and (isinstance(row["references"], str) or not row["references"]):
        return "'references' must be a non-empty list of captions"
    if task == "vqa" and not isinstance(row["answer"], str) and not row["answer"]:
        return "'answer' must be a string or a non-empty list of accepted answers"
    if task == "grounding" and (not isinstance(row["box"], list) or len(row["box"]) != 4):
        return "'box' must be [x1, y1, x2, y2]"
    if task == "detection" and (
        not isinstance(row["objects"], list)
        or not all(
            isinstance(o, dict) and "label" in o and len(o.get("box", ())) == 4 for o in row["objects"]
        )
    ):
        return '\'objects\' must be a list of {"label", "box": [x1, y1, x2, y2]}'
    return None


def _render_prompts(template: str, rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        fields = {**row, "expr": row.get("expression", "")}
        try:
            out.append(template.format_map(fields))
        except (KeyError, IndexError) as err:
            raise ValueError(
                f"prompt template {template!r} names {err}, which rows do not have; "
                f"fields: {', '.join(sorted(fields))}"
            ) from None
    return out


def _load_batch_images(root: Path, rows: Sequence[dict]) -> tuple[dict[str, Image.Image], dict[str, str]]:
    """Each distinct image of the batch once: (path -> image, path -> why it could not be read)."""
    images, errors = {}, {}
    for path in dict.fromkeys(r["image"] for r in rows):
        try:
            images[path] = load_image_file(root / path)
        except (ImageError, OSError) as err:
            errors[path] = str(err)
    return images, errors


# --- the run -----------------------------------------------------------------------------------


def _state(device: str):
    from accelerate import PartialState

    # A CPU run must say so: otherwise PartialState ignores torchrun's ranks on a machine without GPUs.
    return PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))


def run_eval(settings: EvalSettings, progress: bool = True) -> dict | None:
    """Evaluate `settings.model` on `settings.data`; rank 0 writes the files and returns the
    report (``report.json``'s content), other ranks return None. Bad inputs raise ValueError or
    FileNotFoundError on every rank before any generation."""
    from seechat.model.checkpoint import load_checkpoint

    t0 = time.time()
    task = TASKS[settings.task]
    if settings.batch_size < 1 or settings.max_new_tokens < 1 or settings.limit < 0:
        raise ValueError("batch size and max new tokens must be >= 1, limit >= 0")
    get_tokenizer(settings.tokenize)("测试")  # an unknown name or missing jieba fails now, not after decoding
    rows = read_jsonl(settings.data)
    rows = rows[: settings.limit] if settings.limit else rows
    _check_rows(task, rows, settings.data)
    root = resolve_image_root(settings.data, rows, settings.image_root)
    template = settings.prompt if settings.prompt is not None else task.prompt
    prompts = _render_prompts(template, rows)

    state = _state(settings.device)
    per_rank = settings.device == "auto" or (settings.device == "cuda" and state.num_processes > 1)
    device = state.device if per_rank else torch.device(settings.device)
    model, processor = load_checkpoint(settings.model, device=device)
    if template.count(processor.image_token) != 1:
        raise ValueError(
            f"the prompt template must contain {processor.image_token} exactly once: {template!r}"
        )

    params = SamplingParams(max_new_tokens=settings.max_new_tokens)
    mine = shard_batches(len(rows), settings.batch_size, state.process_index, state.num_processes)
    records: list[dict] = []
    who = f" [rank {state.process_index}/{state.num_processes}]" if state.num_processes > 1 else ""
    with Engine(model, processor, _engine_config(settings.batch_size)) as engine:
        for batch in tqdm(
            mine,
            desc=f"{task.name}{who}",
            unit="batch",
            disable=not (progress and state.is_local_main_process),
        ):
            images, errors = _load_batch_images(root, [rows[i] for i in batch])
            ok = [i for i in batch if rows[i]["image"] in images]
            records += [
                {"index": i, "error": errors[rows[i]["image"]]} for i in batch if rows[i]["image"] in errors
            ]
            if ok:
                answers = generate_answers(
                    engine,
                    processor,
                    [prompts[i] for i in ok],
                    [images[rows[i]["image"]] for i in ok],
                    params,
                )
                records += [{"index": i, "prediction": a} for i, a in zip(ok, answers, strict=True)]

    shards = settings.out / SHARD_DIR
    shards.mkdir(parents=True, exist_ok=True)
    write_jsonl(shards / f"rank{state.process_index}-of-{state.num_processes}.jsonl", records)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    by_index = _merge_shards(shards, state.num_processes, len(rows))
    report = _score_and_write(
        settings, task, rows, prompts, by_index, root, template, state.num_processes, str(device)
    )
    report["wall_seconds"] = round(time.time() - t0, 2)
    (settings.out / "report.json").write_text(
        json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    (settings.out / "report.md").write_text(_markdown(report, task), encoding="utf-8")
    return report


def _merge_shards(shards: Path, world_size: int, n_rows: int) -> dict[int, dict]:
    by_index: dict[int, dict] = {}
    for rank in range(world_size):
        path = shards / f"rank{rank}-of-{world_size}.jsonl"
        by_index.update((r["index"], r) for r in read_jsonl(path))
        path.unlink()
    if sorted(by_index) != list(range(n_rows)):
        raise RuntimeError(f"the ranks' predictions cover {len(by_index)} of {n_rows} rows")
    if not any(shards.iterdir()):
        shards.rmdir()
    return by_index


def _score_and_write(
    settings: EvalSettings,
    task: Task,
    rows: list[dict],
    prompts: list[str],
    by_index: dict[int, dict],
    root: Path,
    template: str,
    world_size: int,
    device: str,
) -> dict:
    scored = [i for i in range(len(rows)) if "prediction" in by_index[i]]
    predictions = [by_index[i]["prediction"] for i in scored]
    metrics, per_row = (
        task.score([rows[i] for i in scored], predictions, settings.tokenize) if scored else ({}, [])
    )
    extra = dict(zip(scored, per_row, strict=True))
    out_rows = []
    for i, row in enumerate(rows):
        rec = {
            "id": row["id"],
            "image": row["image"],
            "prompt": prompts[i],
            "prediction": by_index[i].get("prediction"),
            "reference": row[task.reference],
        }
        if "type" in row:
            rec["type"] = row["type"]
        rec.update(extra.get(i, {"error": by_index[i].get("error")}))
        out_rows.append(rec)
    write_jsonl(settings.out / "predictions.jsonl", out_rows)
    skipped = [
        {"id": rows[i]["id"], "image": rows[i]["image"], "error": by_index[i]["error"]}
        for i in range(len(rows))
        if "error" in by_index[i]
    ]
    return {
        "task": task.name,
        "model": str(settings.model),
        "data": str(settings.data),
        "image_root": str(root),
        "prompt": template,
        "rows": len(rows),
        "scored": len(scored),
        "skipped": skipped,
        "metrics": metrics,
        "settings": {
            **{
                k: v
                for k, v in asdict(settings).items()
                if k in ("batch_size", "max_new_tokens", "limit", "tokenize")
            },
            "device": device,
            "num_processes": world_size,
            "decoding": "greedy",
        },
    }


# --- report.md ---------------------------------------------------------------------------------


def _fmt(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _markdown(report: dict, task: Task) -> str:
    s = report["settings"]
    lines = [
        f"# {task.title} evaluation",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{report['model']}` |",
        f"| data | `{report['data']}` ({report['rows']} rows) |",
        f"| image root | `{report['image_root']}` |",
        f"| prompt | `{report['prompt'].replace(chr(10), '⏎')}` |",
        f"| decoding | greedy, batch {s['batch_size']}, at most {s['max_new_tokens']} new tokens, "
        f"{s['num_processes']} process(es) on {s['device']} |",
        f"| scored | {report['scored']} of {report['rows']} rows |",
        f"| skipped | {len(report['skipped'])} (image missing or unreadable; not in the metrics) |",
        "",
        "## Metrics",
        "",
    ]
    metrics = dict(report["metrics"])
    by_type, counts = metrics.pop("accuracy_by_type", None), metrics.pop("count_by_type", None)
    ap, recall, objects = (
        metrics.pop(k, None) for k in ("ap_by_class", "recall_by_class", "objects_by_class")
    )
    if not metrics:
        lines.append("No row could be scored.")
    else:
        if task.name == "caption":
            lines.append(
                f"Tokenisation for CIDEr-D and BLEU: `{s['tokenize']}`. Exact match: equal to a reference "
                "up to width, case, numerals and punctuation."
            )
            lines.append("")
        lines += ["| metric | value |", "|---|---:|"] + [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    if by_type:
        lines += [
            "",
            "## VQA accuracy by question type",
            "",
            "| type | questions | accuracy |",
            "|---|---:|---:|",
        ]
        lines += [f"| {t} | {counts[t]} | {_fmt(acc)} |" for t, acc in by_type.items()]
    if ap:
        lines += [
            "",
            "## Detection by class (IoU 0.5)",
            "",
            "| class | objects | AP | recall |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {c} | {objects[c]} | {_fmt(ap[c])} | {_fmt(recall[c])} |" for c in ap]
    skipped = report["skipped"]
    lines += ["", f"## Skipped rows ({len(skipped)})", ""]
    if not skipped:
        lines.append("None: every image was read.")
    else:
        lines += ["| id | image | why |", "|---|---|---|"]
        lines += [
            f"| {r['id']} | `{r['image']}` | {r['error'].replace('|', '/')} |" for r in skipped[:MAX_LISTED]
        ]
        if len(skipped) > MAX_LISTED:
            lines.append(f"\n… and {len(skipped) - MAX_LISTED} more (all are in report.json)")
    lines += [
        "",
        "Files: [predictions.jsonl](predictions.jsonl) (every row), [report.json](report.json).",
        "",
    ]
    return "\n".join(lines)
