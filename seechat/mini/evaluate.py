"""Evaluate a checkpoint on a mini-world split: VQA, grounding, detection and captions, plus a
blind control.

The decoding and the scoring are `seechat.eval.tasks`' (the task table behind `seechat eval`):
batched greedy generation with the tasks' prompts, VQA accuracy per question type, grounding
Acc@0.5, detection mAP@0.5 and recall per class (every object with its box), caption exact match /
CIDEr-D / BLEU-4. What this module adds is the demo's view: the blind control (the same questions
about a blank image), the caption win rate against the world's noisy alt-text under the mini
Chinese-CLIP scorer, and the demo's flat `results.json` keys. Predictions are written next to the
report.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from seechat.data.image_sources import JsonlImages
from seechat.data.images import load_image
from seechat.data.jsonl import read_jsonl, write_jsonl
from seechat.data.processor import SeeChatProcessor
from seechat.data.scorer import ChineseClipScorer
from seechat.eval.tasks import TASKS, answer_rows
from seechat.eval.winrate import run_winrate
from seechat.model.modeling import SeeChatModel

__all__ = ["answer_split", "blank_like", "evaluate_split", "load_images"]

TOKENIZE = "char"  # caption metrics' tokenisation, as `seechat eval caption` defaults to

# Detection answers are ~4x as long as the other tasks' and cost ~70 s on the 2-core CPU for the
# whole test split; the first 250 images (~650 boxes) cost ~20 s.
DETECTION_IMAGES = 250


def load_images(world: Path, rows: list[dict]) -> dict[str, Image.Image]:
    """Each row's image (paths relative to the world root), by path, each opened once."""
    return {r["image"]: load_image(world / r["image"]) for r in rows}


# results.json key -> the caption task's metric
CAPTION_KEYS = {
    "caption_exact_match": "exact_match",
    "caption_cider_d": "cider_d",
    "caption_bleu_4": "bleu_4",
}


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
    max_new_tokens: int = 48,
    detection: list[dict] | None = None,
) -> tuple[dict, dict[str, list[str]]]:
    """Greedy answers to the VQA questions, referring expressions, caption prompts and (when given)
    detection requests of the given rows, and the metrics that need no scorer: (VQA per type, the
    blind control's VQA per type (the same questions about a blank image), grounding Acc@0.5,
    detection mAP@0.5 and recall per class; predictions by task: "vqa", "vqa_blind", "grounding",
    "captions", "detection")."""

    def ask(
        task: str, rows: list[dict], seen: dict[str, Image.Image], what: str, max_new: int = max_new_tokens
    ) -> list[str]:
        return answer_rows(
            model,
            processor,
            TASKS[task],
            rows,
            seen,
            batch_size,
            max_new,
            desc=f"{what} {tag}".strip(),
        )

    model.eval()
    blank = blank_like(next(iter(images.values()))) if images else None
    preds = {
        "vqa": ask("vqa", vqa, images, "vqa"),
        "vqa_blind": ask("vqa", vqa, dict.fromkeys(images, blank), "vqa blind"),
        "grounding": ask("grounding", grounding, images, "grounding"),
        "captions": ask("caption", captions, images, "captions"),
    }
    seeing, blind = _score("vqa", vqa, preds["vqa"]), _score("vqa", vqa, preds["vqa_blind"])
    metrics = {
        "vqa_accuracy": seeing.get("accuracy", 0.0),
        "vqa_accuracy_by_type": seeing.get("accuracy_by_type", {}),
        "vqa_accuracy_blind": blind.get("accuracy", 0.0),
        "vqa_accuracy_blind_by_type": blind.get("accuracy_by_type", {}),
        "vqa_questions": len(vqa),
        "grounding_acc_at_0.5": _score("grounding", grounding, preds["grounding"]).get("acc_at_0.5", 0.0),
        "grounding_items": len(grounding),
    }
    if detection:
        cap = TASKS["detection"].max_new_tokens
        preds["detection"] = ask("detection", detection, images, "detection", cap)
        det = _score("detection", detection, preds["detection"])
        metrics |= {
            "detection_map_at_0.5": det["map_at_0.5"],
            "detection_ap_by_class": det["ap_by_class"],
            "detection_recall_by_class": det["recall_by_class"],
            "detection_images": len(detection),
        }
    return metrics, preds


def _score(task: str, rows: list[dict], predictions: list[str]) -> dict:
    """The task table's metrics of `predictions` (empty when there are no rows)."""
    return TASKS[task].score(rows, predictions, TOKENIZE)[0] if rows else {}


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
    det = det[:DETECTION_IMAGES]
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
    caption_metrics = _score("caption", caps, cap_pred)
    return {
        **metrics,
        **{key: caption_metrics.get(name, 0.0) for key, name in CAPTION_KEYS.items()},
        "caption_winrate_vs_alt_text": float(wr.win_rate[i_model]),
        "caption_winrate_ci95": [float(wr.ci_low[i_model]), float(wr.ci_high[i_model])],
        "caption_clip_score_mean": {m: float(s) for m, s in zip(wr.methods, wr.mean_score, strict=True)},
        "caption_images": len(caps),
    }
