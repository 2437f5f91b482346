"""The one home of the `<box>` format: ``<box>(x1,y1),(x2,y2)</box>``, Qwen-VL style.

Coordinates are normalised to 0..1000 of the image's width and height, top-left corner first.
The mini world writes its grounding answers with `format_box`, the grounding metric reads model
output with `parse_box`, and both follow the rules below.

Writing (`format_box`, `normalize_box`): pixel boxes are scaled to 0..1000, rounded to integers
and clamped into [0, 1000]; the text is exactly ``<box>(x1,y1),(x2,y2)</box>``, no spaces.

Reading (`parse_box`), one rule set:

1. full-width ASCII (``（１０，２０）``) and the ideographic space are folded to half-width first;
2. only the *first* ``<box>…</box>`` counts; there is no search for a later, better-formed one;
3. its body must be two ``(x, y)`` pairs, with an optional comma between them and spaces
   anywhere; numbers may be integers or decimals (``1.5``);
4. every coordinate lies in [0, 1000], and x1 <= x2, y1 <= y2;

otherwise the box is None (a miss). The result is floats; integer boxes compare equal to their
int tuples. (Two parsers used to disagree: the mini world's skipped a malformed first box to find
a later one, accepted only integers and no full-width text, and checked no range; the grounding
metric's strict rules won, since a model's answer is scored by its first box.)

What this module is not: IoU and accuracy (`seechat.eval.grounding`, `seechat.eval.detection`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

BOX_SCALE = 1000  # coordinates are normalised to [0, BOX_SCALE]

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) in the 0..1000 frame

_FOLD = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}  # full-width ASCII, ideographic space
_BOX_TAG = re.compile(r"<box>(.*?)</box>", re.DOTALL)
_NUM = r"\s*([-+]?\d+(?:\.\d+)?)\s*"
_BOX_BODY = re.compile(rf"\s*\({_NUM},{_NUM}\)\s*,?\s*\({_NUM},{_NUM}\)\s*")


def _wh(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else image_size


def normalize_box(bbox: Sequence[float], image_size: int | tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel (x1, y1, x2, y2) -> integers in 0..1000 of (width, height)."""
    w, h = _wh(image_size)
    x1, y1, x2, y2 = (
        min(BOX_SCALE, max(0, round(v / d * BOX_SCALE))) for v, d in zip(bbox, (w, h, w, h), strict=True)
    )
    return (x1, y1, x2, y2)


def denormalize_box(
    box: Sequence[float], image_size: int | tuple[int, int]
) -> tuple[float, float, float, float]:
    """0..1000 box -> pixel (x1, y1, x2, y2) floats."""
    w, h = _wh(image_size)
    x1, y1, x2, y2 = (v / BOX_SCALE * d for v, d in zip(box, (w, h, w, h), strict=True))
    return (x1, y1, x2, y2)


def box_text(box: Sequence[int]) -> str:
    """A 0..1000 integer box -> ``<box>(x1,y1),(x2,y2)</box>``."""
    x1, y1, x2, y2 = box
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def format_box(bbox: Sequence[float], image_size: int | tuple[int, int]) -> str:
    """Pixel bbox -> ``<box>(x1,y1),(x2,y2)</box>`` in 0..1000 coordinates."""
    return box_text(normalize_box(bbox, image_size))


def parse_box(text: str) -> Box | None:
    """The first ``<box>(x1,y1),(x2,y2)</box>`` in `text` as floats, or None when it is missing or
    malformed (see the module docstring for the rules)."""
    tag = _BOX_TAG.search(text.translate(_FOLD))
    return None if tag is None else _box_body(tag.group(1))


def iter_boxes(text: str) -> list[tuple[int, int, Box | None]]:
    """Every ``<box>…</box>`` of `text` under the same rules: (start, end, box or None when
    malformed). Folding maps one character to one, so start and end index `text` itself."""
    return [(m.start(), m.end(), _box_body(m.group(1))) for m in _BOX_TAG.finditer(text.translate(_FOLD))]


def _box_body(inner: str) -> Box | None:
    body = _BOX_BODY.fullmatch(inner)
    if body is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in body.groups())
    if not all(0.0 <= v <= BOX_SCALE for v in (x1, y1, x2, y2)) or x1 > x2 or y1 > y2:
        return None
    return (x1, y1, x2, y2)
