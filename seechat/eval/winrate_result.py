"""What the caption win-rate experiment computes, and the rules it is computed by.

What this module is: :class:`WinRateResult` (the tables and statistics of one run),
:class:`Problem` (an input problem, listed, never silently dropped), :data:`TIE_RULE` and
:data:`PROBLEM_KINDS` (the rules in words, as the report presents them). The experiment
(``seechat.eval.winrate``) fills these and the report (``seechat.eval.winrate_report``) renders
them; both import this module, and neither imports the other's direction back.

What it is not: any computation or I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["PROBLEM_KINDS", "TIE_RULE", "Problem", "WinRateResult"]

TIE_RULE = (
    "The winner of an image is the method whose caption scores highest. When k methods tie for the "
    "highest score, each gets 1/k of a win, so win rates sum to 1. A method with no caption for an "
    "image scores NaN there: it cannot win that image. Images with no scored caption, and unreadable "
    "images, are left out."
)

PROBLEM_KINDS = {
    "missing_caption": "the method has no caption for this image: it scores NaN there and cannot win it",
    "duplicate_caption": "the captions file has more than one row for this image: the first row is used",
    "duplicate_image": "the image list names this image more than once: it is scored once",
    "unreadable_image": "the image could not be opened or decoded: it is left out of every statistic",
    "unknown_image": "a captions row names an image that is not in the image list: the row is ignored",
    "bad_caption_row": "a captions line is not JSON with string 'image' and 'caption': the line is ignored",
    "empty_caption": "the caption is empty: it is still scored",
    "no_scores": "no method has a caption for this image: it is left out of every statistic",
}


@dataclass(frozen=True)
class Problem:
    kind: str  # a key of PROBLEM_KINDS
    image: str = ""  # "" when not about one image
    method: str = ""  # "" when not about one method
    detail: str = ""


@dataclass(frozen=True)
class WinRateResult:
    methods: list[str]
    image_ids: list[str]  # rows of the tables below, one per unique listed image
    scores: np.ndarray  # (I, M) cosine of each method's caption with the image; NaN = missing
    wins: np.ndarray  # (I, M) fractional wins; a scored image's row sums to 1, others are 0
    scored: np.ndarray  # (I,) bool: the image counts (readable, at least one score)
    win_rate: np.ndarray  # (M,) wins / number of scored images
    ci_low: np.ndarray  # (M,) percentile-bootstrap bounds; NaN without bootstrap
    ci_high: np.ndarray  # (M,)
    mean_score: np.ndarray  # (M,) mean cosine over the scored images the method has a caption for
    head_to_head: np.ndarray  # (M, M) row beats column, over images both scored; ties 0.5; NaN diagonal
    n_bootstrap: int
    seed: int
    confidence: float
    image_status: list[str]  # (I,) "ok", "no_scores" or "unreadable_image"
    scorer: str = ""
    problems: list[Problem] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # written report files by role

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())

    def summary(self) -> dict[str, dict[str, float]]:
        """Per method: win_rate, ci_low, ci_high, wins, mean_score, n_captions (scored images with a
        caption)."""
        has_score = ~np.isnan(self.scores[self.scored])
        return {
            m: {
                "win_rate": float(self.win_rate[j]),
                "ci_low": float(self.ci_low[j]),
                "ci_high": float(self.ci_high[j]),
                "wins": float(self.wins[:, j].sum()),
                "mean_score": float(self.mean_score[j]),
                "n_captions": int(has_score[:, j].sum()),
            }
            for j, m in enumerate(self.methods)
        }
