"""Detection evaluation: every ``label<box>(x1,y1),(x2,y2)</box>`` in an answer, mAP@0.5, per-class recall.

What this module is: a parser for answers that list objects with their boxes (each box's label is
the last class name written between the previous box and it:
"红色的圆形<box>…</box>，蓝色的正方形<box>…</box>"), and Pascal-VOC-style average precision at an
IoU threshold:

- per image and class, predictions are taken in descending score; each is matched to the unmatched
  ground-truth box of its class with the highest IoU, a hit when that IoU >= threshold; a second
  prediction of an already matched box is a false positive;
- AP of a class is the area under its precision envelope (all-point interpolation, as VOC 2010+
  and COCO do per threshold) over the predictions of every image ranked by score. Predictions with
  equal scores form one rank: the curve gets a point only after the whole tie, so the result never
  depends on the order of tied predictions. A generative model gives no scores, so every box it
  writes has score 1: its AP is then precision x recall of the class;
- mAP is the mean AP over classes with at least one ground-truth box; recall per class is matched
  ground truth over ground truth at any score.

What it is not: COCO's 101-point interpolation or IoU sweep, and not a box parser of its own (the
box syntax and IoU are `seechat.eval.grounding`'s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from seechat.data.boxes import Box, iter_boxes
from seechat.eval.grounding import box_iou

__all__ = ["DetectionResult", "Prediction", "average_precision", "detection_metrics", "parse_detections"]


@dataclass(frozen=True)
class Prediction:
    label: str
    box: Box  # 0..1000 frame
    score: float = 1.0


@dataclass(frozen=True)
class DetectionResult:
    map: float  # mean AP over classes with ground truth
    ap_by_class: dict[str, float]
    recall_by_class: dict[str, float]
    gt_by_class: dict[str, int]
    true_positives: int
    predictions: int
    threshold: float


def parse_detections(text: str, classes: Sequence[str]) -> list[Prediction]:
    """Every well-formed box of `text` with its label: the class name that ends last in the text
    between the previous box and this one (a box with no class name before it, or a malformed one,
    is dropped). Score 1 for all."""
    out: list[Prediction] = []
    start = 0
    for begin, end, box in iter_boxes(text):
        span = text[start:begin]
        start = end
        ends = {c: span.rfind(c) + len(c) for c in classes if c in span}
        if box is None or not ends:
            continue
        label = max(ends, key=lambda c: (ends[c], len(c)))
        out.append(Prediction(label, box))
    return out


def average_precision(scores: Sequence[float], hits: Sequence[bool], n_gt: int) -> float:
    """All-point interpolated AP of one class: `scores` and `hits` per prediction (any order),
    `n_gt` ground-truth boxes. Tied scores are one rank (see the module docstring)."""
    if n_gt == 0:
        return float("nan")
    if not len(scores):
        return 0.0
    s = np.asarray(scores, dtype=np.float64)
    h = np.asarray(hits, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s, h = s[order], h[order]
    tp, fp = np.cumsum(h), np.cumsum(1 - h)
    last = np.r_[s[1:] != s[:-1], True]  # the end of each group of equal scores
    recall = np.r_[0.0, tp[last] / n_gt]
    precision = np.r_[1.0, tp[last] / (tp[last] + fp[last])]
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at recall >= r
    return float(np.sum((recall[1:] - recall[:-1]) * envelope[1:]))


def detection_metrics(
    ground_truth: Sequence[Sequence[tuple[str, Box]]],
    predictions: Sequence[Sequence[Prediction]],
    threshold: float = 0.5,
) -> DetectionResult:
    """mAP@threshold and recall per class over images: `ground_truth[i]` the (label, box) pairs of
    image i, `predictions[i]` its predictions."""
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} images of ground truth but {len(predictions)} of predictions")
    classes = sorted({label for gts in ground_truth for label, _ in gts})
    scores: dict[str, list[float]] = {c: [] for c in classes}
    hits: dict[str, list[bool]] = {c: [] for c in classes}
    matched = dict.fromkeys(classes, 0)
    gt_count = dict.fromkeys(classes, 0)
    n_pred = 0
    for gts, preds in zip(ground_truth, predictions, strict=True):
        n_pred += len(preds)
        for c in classes:
            gt_boxes = [b for label, b in gts if label == c]
            gt_count[c] += len(gt_boxes)
            taken = [False] * len(gt_boxes)
            mine = sorted((p for p in preds if p.label == c), key=lambda p: -p.score)
            for p in mine:
                best, best_iou = -1, threshold
                if gt_boxes:
                    ious = box_iou([p.box] * len(gt_boxes), gt_boxes)
                    for j, iou in enumerate(ious):
                        if not taken[j] and iou >= best_iou:
                            best, best_iou = j, iou
                if best >= 0:
                    taken[best] = True
                scores[c].append(p.score)
                hits[c].append(best >= 0)
            matched[c] += sum(taken)
    ap = {c: average_precision(scores[c], hits[c], gt_count[c]) for c in classes}
    return DetectionResult(
        map=float(np.mean(list(ap.values()))) if ap else 0.0,
        ap_by_class=ap,
        recall_by_class={c: matched[c] / gt_count[c] for c in classes},
        gt_by_class=gt_count,
        true_positives=sum(matched.values()),
        predictions=n_pred,
        threshold=threshold,
    )
