"""Grounding evaluation: parse ``<box>(x1,y1),(x2,y2)</box>`` from model output, IoU, Acc@0.5.

What this module is: IoU on continuous coordinates (area = width × height, no "+1 pixel"
convention) and accuracy at an IoU threshold (a hit needs IoU ≥ threshold) of the first box in
each model output. The box format and its parsing rules (first ``<box>`` only, full-width folded,
0–1000 range, x1 <= x2 and y1 <= y2) live in `seechat.data.boxes`; a missing or malformed first
box scores IoU 0.

What it is not: multi-box matching (no Hungarian assignment), and not pixel-coordinate boxes —
convert ground truth to the 0–1000 frame first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from seechat.data.boxes import Box, parse_box

__all__ = ["GroundingResult", "box_iou", "grounding_accuracy"]


@dataclass(frozen=True)
class GroundingResult:
    accuracy: float  # fraction of items with IoU >= threshold
    ious: list[float]  # per item; 0 for a missing or malformed box
    parsed: list[bool]  # per item: whether a valid box was found
    threshold: float


def box_iou(boxes_a: np.ndarray | Sequence[Box], boxes_b: np.ndarray | Sequence[Box]) -> np.ndarray:
    """Element-wise IoU of two aligned box arrays: (N, 4), (N, 4) -> (N,). Empty unions give 0."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    if a.shape != b.shape:
        raise ValueError(f"box arrays differ in shape: {a.shape} vs {b.shape}")
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = width * height  # (N,)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def grounding_accuracy(
    outputs: Sequence[str], targets: Sequence[Box], *, threshold: float = 0.5
) -> GroundingResult:
    """Acc@threshold of the first box in each model output against its target box (0–1000 frame)."""
    if len(outputs) != len(targets):
        raise ValueError(f"{len(outputs)} outputs but {len(targets)} target boxes")
    boxes = [parse_box(text) for text in outputs]
    parsed = [box is not None for box in boxes]
    predicted = np.array([box if box is not None else (0.0, 0.0, 0.0, 0.0) for box in boxes]).reshape(-1, 4)
    ious = np.where(parsed, box_iou(predicted, targets), 0.0) if boxes else np.zeros(0)
    accuracy = float(np.mean(ious >= threshold)) if len(ious) else 0.0
    return GroundingResult(accuracy=accuracy, ious=ious.tolist(), parsed=parsed, threshold=threshold)
