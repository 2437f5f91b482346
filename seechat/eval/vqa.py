"""Exact-match VQA accuracy for short Chinese answers, overall and per question type.

What this module is: the matching rule below, applied to predictions and ground-truth answers,
with the accuracy broken down by question type (e.g. the mini world's ``count`` / ``color`` /
``shape`` / ``position``).

Matching rule. Both sides are normalised with :func:`seechat.eval.normalize.normalize_answer`
(full-width → half-width, lower-case, Chinese numerals → digits, punctuation and whitespace
removed), so ``"两个。"``, ``"２个"`` and ``"二个"`` are all ``"2个"``. A prediction is correct when

1. its normalised form equals the normalised answer, or
2. they are equal once a measure word right after a number is dropped from the end of each:
   a side that is digits followed by one of :data:`MEASURE_WORDS` counts as the bare number, so
   ``"3个"`` matches ``"3"`` (and ``"3"`` matches ``"3个"``, and ``"三只"`` matches ``"3个"``: the
   count is what is asked). Nothing else is dropped: ``"3米"`` does not match ``"3"``.

An item may have several accepted answers; it is correct when any one of them matches.

What it is not: VQAv2's soft accuracy over 10 annotators (min(#agreeing / 3, 1)), and no
synonym or LLM-judged matching.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from seechat.eval.normalize import normalize_answer

__all__ = ["MEASURE_WORDS", "VqaResult", "answers_match", "vqa_accuracy"]

# Classifiers that follow a count ("3个", "两只"); units with their own meaning (米, 元, 岁) are not here.
MEASURE_WORDS = frozenset("个只条张本辆件块头位匹棵朵支把颗根枚座片双对台架艘名种串盏粒")

_COUNTED = re.compile(r"(\d+)(.)")


@dataclass(frozen=True)
class VqaResult:
    accuracy: float  # over all items
    per_type: dict[str, float]  # question type -> accuracy (empty without question types)
    type_counts: dict[str, int]  # question type -> number of items
    correct: list[bool]  # per item


def _bare_number(normalized: str) -> str | None:
    """``"3个"`` → ``"3"``; None when the text is not digits + one measure word."""
    match = _COUNTED.fullmatch(normalized)
    return match.group(1) if match and match.group(2) in MEASURE_WORDS else None


def answers_match(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` counts as ``answer`` under the module's matching rule."""
    pred, gold = normalize_answer(prediction), normalize_answer(answer)
    return pred == gold or (_bare_number(pred) or pred) == (_bare_number(gold) or gold)


def vqa_accuracy(
    predictions: Sequence[str],
    answers: Sequence[str | Sequence[str]],
    question_types: Sequence[str] | None = None,
) -> VqaResult:
    """Accuracy of ``predictions[i]`` against ``answers[i]`` (one answer or a list of accepted ones)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answers")
    if question_types is not None and len(question_types) != len(predictions):
        raise ValueError(f"{len(question_types)} question types for {len(predictions)} predictions")
    correct = [
        any(answers_match(pred, gold) for gold in ([golds] if isinstance(golds, str) else golds))
        for pred, golds in zip(predictions, answers, strict=True)
    ]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for qtype, ok in zip(question_types or [], correct, strict=False):
        by_type[qtype].append(ok)
    return VqaResult(
        accuracy=sum(correct) / len(correct) if correct else 0.0,
        per_type={t: sum(oks) / len(oks) for t, oks in sorted(by_type.items())},
        type_counts={t: len(oks) for t, oks in sorted(by_type.items())},
        correct=correct,
    )
