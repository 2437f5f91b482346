"""Evaluate a checkpoint on a mini-world split: VQA, grounding, detection and captions.

Batched greedy generation (left padding, KV cache) over the split's files, then the metrics of
`seechat.eval`: VQA accuracy per question type, grounding Acc@0.5, detection mAP@0.5 and recall
per class (every object with its box), caption exact match / CIDEr-D /
BLEU-4 against the references, and the caption win rate against the world's noisy alt-text
under the mini Chinese-CLIP scorer. Predictions are written next to the report.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from seechat.data.processor import SeeChatProcessor
from seechat.eval.bleu import bleu
from seechat.eval.cider import cider_d
from seechat.eval.grounding import grounding_accuracy
from seechat.eval.scorer import ChineseClipScorer
from seechat.eval.tasks import (
    CAPTION_PROMPT,
    DETECTION_PROMPT,
    GROUNDING_PROMPT,
    VQA_PROMPT,
    answer_batch,
    caption_exact_match,
    read_jsonl,
    score_detection,
    write_jsonl,
)
from seechat.eval.vqa import vqa_accuracy
from seechat.eval.winrate import JsonlImages, run_winrate
from seechat.model.modeling import SeeChatModel

# answer_batch and read_jsonl are re-exported: seechat.mini.demo and older callers import them from here.
__all__ = [
    "CAPTION_PROMPT",
    "GROUNDING_PROMPT",
    "answer_batch",
    "answer_split",
    "evaluate_split",
    "load_images",
    "read_jsonl",
]


DETECTION_MAX_NEW_TOKENS = 192  # four objects with their boxes are ~130 characters


def load_images(world: Path, rows: list[dict]) -> dict[str, Image.Image]:
    """Each row's image (paths relative to the world root), by path, each opened once."""
    return {r["image"]: Image.open(world / r["image"]).convert("RGB") for r in rows}


def blank_like(image: Image.Image) -> Image.Image:
    """A white image of `image`'s size: the blind control's input (same questions, nothing to see)."""
    return Image.new("RGB", image.size, (255, 255, 255))


def answer_split(
    model: SeeChatModel,
    processor: SeeChatProcessor,
    images: dict[str, Image.Image],
    vqa: list[dict],
    grounding: list[dict],
    captions: list[dict],
    batch_size: int = 64,
    tag: str = "",
    detection: list[dict] | None = None,
) -> tuple[dict, dict[str, list[str]]]:
    """Greedy answers to the VQA questions, referring expressions, caption prompts and (when given)
    detection requests of the given rows, and the metrics that need no scorer: (VQA per type, the
    blind control's VQA per type (the same questions about a blank image), grounding Acc@0.5,
    detection mAP@0.5 and recall per class; predictions by task: "vqa", "vqa_blind", "grounding",
    "captions", "detection")."""

    def ask(prompts: list[str], rows: list[dict], what: str, max_new_tokens: int = 48) -> list[str]:
        return answer_batch(
            model,
            processor,
            prompts,
            [images[r["image"]] for r in rows],
            batch_size,
            max_new_tokens,
            desc=f"{what} {tag}".strip(),
        )

    model.eval()
    blank = blank_like(next(iter(images.values()))) if images else None
    preds = {
        "vqa": ask([VQA_PROMPT.format(**r) for r in vqa], vqa, "vqa"),
        "vqa_blind": answer_batch(
            model,
            processor,
            [VQA_PROMPT.format(**r) for r in vqa],
            [blank] * len(vqa),
            batch_size,
            desc=f"vqa blind {tag}".strip(),
        ),
        "grounding": ask(
            [GROUNDING_PROMPT.format(expr=r["expression"]) for r in grounding], grounding, "grounding"
        ),
        "captions": ask([CAPTION_PROMPT] * len(captions), captions, "captions"),
    }
    vqa_res = vqa_accuracy(preds["vqa"], [r["answer"] for r in vqa], [r["type"] for r in vqa])
    blind = vqa_accuracy(preds["vqa_blind"], [r["answer"] for r in vqa], [r["type"] for r in vqa])
    metrics = {
        "vqa_accuracy": vqa_res.accuracy,
        "vqa_accuracy_by_type": vqa_res.per_type,
        "vqa_accuracy_blind": blind.accuracy,
        "vqa_accuracy_blind_by_type": blind.per_type,
        "vqa_questions": len(vqa),
        "grounding_acc_at_0.5": grounding_accuracy(
            preds["grounding"], [r["box"] for r in grounding]
        ).accuracy,
        "grounding_items": len(grounding),
    }
    if detection:
        preds["detection"] = ask(
            [DETECTION_PROMPT.format(**r) for r in detection],
            detection,
            "detection",
            DETECTION_MAX_NEW_TOKENS,
        )
        det, _ = score_detection(detection, preds["detection"])
        metrics |= {
            "detection_map_at_0.5": det["map_at_0.5"],
            "detection_ap_by_class": det["ap_by_class"],
            "detection_recall_by_class": det["recall_by_class"],
            "detection_images": len(detection),
        }
    return metrics, preds


def evaluate_split(
    model: SeeChatModel,
    processor: SeeChatProcessor,
    world: str | Path,
    out_dir: str | Path,
    scorer_path: str | Path,
    split: str = "test",
    limit: int = 0,
) -> dict:
    """All mini-world metrics of one checkpoint on `split`; writes predictions and returns results."""
    world, out = Path(world), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vqa = read_jsonl(world / split / "vqa.jsonl")
    grd = read_jsonl(world / split / "grounding.jsonl")
    caps = read_jsonl(world / split / "captions.jsonl")
    det = read_jsonl(world / split / "detection.jsonl")
    if limit:
        vqa, grd, caps, det = vqa[:limit], grd[:limit], caps[:limit], det[:limit]
    images = load_images(world, vqa + grd + caps + det)
    metrics, preds = answer_split(model, processor, images, vqa, grd, caps, detection=det)
    vqa_pred, grd_pred, cap_pred = preds["vqa"], preds["grounding"], preds["captions"]

    write_jsonl(
        out / "vqa_predictions.jsonl",
        [
            {**r, "prediction": p, "prediction_blind": b}
            for r, p, b in zip(vqa, vqa_pred, preds["vqa_blind"], strict=True)
        ],
    )
    write_jsonl(
        out / "grounding_predictions.jsonl",
        [{**r, "prediction": p} for r, p in zip(grd, grd_pred, strict=True)],
    )
    write_jsonl(
        out / "detection_predictions.jsonl",
        [{**r, "prediction": p} for r, p in zip(det, preds["detection"], strict=True)],
    )
    captions_file = out / "captions.jsonl"
    write_jsonl(
        captions_file, [{"image": r["image"], "caption": p} for r, p in zip(caps, cap_pred, strict=True)]
    )

    refs = [r["references"] for r in caps]
    exact = sum(caption_exact_match(p, r["references"]) for p, r in zip(cap_pred, caps, strict=True)) / max(
        1, len(caps)
    )
    alt_file = out / "alt_text.jsonl"
    alt_rows = {r["image"]: r for r in read_jsonl(world / split / "alt_text.jsonl")}
    write_jsonl(alt_file, [{"image": r["image"], "caption": alt_rows[r["image"]]["caption"]} for r in caps])
    source = JsonlImages(captions_file, image_root=world)
    scorer = ChineseClipScorer.from_pretrained(str(scorer_path))
    wr = run_winrate(
        source.ids,
        source.load,
        {"model": captions_file, "alt_text": alt_file},
        scorer,
        out / "winrate",
        n_bootstrap=500,
    )
    i_model = wr.methods.index("model")
    return {
        **metrics,
        "caption_exact_match": exact,
        "caption_cider_d": cider_d(cap_pred, refs).score,
        "caption_bleu_4": bleu(cap_pred, refs).score,
        "caption_winrate_vs_alt_text": float(wr.win_rate[i_model]),
        "caption_winrate_ci95": [float(wr.ci_low[i_model]), float(wr.ci_high[i_model])],
        "caption_clip_score_mean": {m: float(s) for m, s in zip(wr.methods, wr.mean_score, strict=True)},
        "caption_images": len(caps),
    }
