"""Grounding evaluation: parse ``<box>(x1,y1),(x2,y2)</box>`` from model output, IoU, Acc@0.5.

What this module is: the box format the project's grounding data uses (Qwen-VL style, integer or
decimal coordinates normalised to 0–1000, top-left then bottom-right), a strict parser, IoU on
continuous coordinates (area = width × height, no "+1 pixel" convention) and accuracy at an IoU
threshold (a hit needs IoU ≥ threshold).

Parsing rule: only the *first* ``<box>…</box>`` in the output counts. Full-width brackets and
commas are folded to half-width first. The box is a miss (None) when that first box is malformed:
not two ``(x, y)`` pairs, a coordinate outside [0, 1000], or x1 > x2 or y1 > y2. A missing box
or a malformed first box scores IoU 0.

What it is not: multi-box matching (no Hungarian assignment), and not pixel-coordinate boxes —
convert ground truth to the 0–1000 frame first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from seechat.eval.normalize import to_halfwidth

__all__ = ["BOX_SCALE", "Box", "GroundingResult", "box_iou", "grounding_accuracy", "iter_boxes", "parse_box"]

BOX_SCALE = 1000.0  # coordinates are normalised to [0, BOX_SCALE]

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2)

_BOX_TAG = re.compile(r"<box>(.*?)</box>", re.DOTALL)
_NUM = r"\s*([-+]?\d+(?:\.\d+)?)\s*"
_BOX_BODY = re.compile(rf"\s*\({_NUM},{_NUM}\)\s*,?\s*\({_NUM},{_NUM}\)\s*")


@dataclass(frozen=True)
class GroundingResult:
    accuracy: float  # fraction of items with IoU >= threshold
    ious: list[float]  # per item; 0 for a missing or malformed box
    parsed: list[bool]  # per item: whether a valid box was found
    threshold: float


def parse_box(text: str) -> Box | None:
    """First ``<box>(x1,y1),(x2,y2)</box>`` in ``text`` as floats, or None (missing or malformed)."""
    tag = _BOX_TAG.search(to_halfwidth(text))
    return None if tag is None else _box_body(tag.group(1))


def iter_boxes(text: str) -> list[tuple[int, int, Box | None]]:
    """Every ``<box>…</box>`` of ``text``: (start, end, box or None when malformed), where start and
    end index the half-width-folded text (same length: folding maps one character to one)."""
    return [(m.start(), m.end(), _box_body(m.group(1))) for m in _BOX_TAG.finditer(to_halfwidth(text))]


def _box_body(inner: str) -> Box | None:
    body = _BOX_BODY.fullmatch(inner)
    if body is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in body.groups())
    if not all(0.0 <= v <= BOX_SCALE for v in (x1, y1, x2, y2)) or x1 > x2 or y1 > y2:
        return None
    return (x1, y1, x2, y2)


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
