"""BLEU-1..4 for Chinese captions, computed exactly as coco-caption's ``Bleu`` scorer.

What this module is: a dependency-free re-implementation of ``pycocoevalcap/bleu`` with its
``option="closest"``: candidate n-gram counts clipped by the maximum count in any one reference,
the brevity penalty uses the reference length closest to the candidate's (ties → the shorter),
corpus BLEU sums clipped matches, guesses and lengths over all images before the geometric mean,
and the same tiny/small smoothing constants (so a zero n-gram match gives ~0, not an error).
Texts are tokenised with ``seechat.eval.normalize`` ("char" by default, or "jieba").

What it is not: sacreBLEU (different tokenisation, smoothing and brevity rules); numbers from the
two are not comparable.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from seechat.eval.normalize import as_tokens, ngram_counts

__all__ = ["BleuResult", "bleu"]

Text = str | Sequence[str]  # a caption, or its tokens

_TINY = 1e-15  # coco-caption's smoothing: numerator
_SMALL = 1e-9  # coco-caption's smoothing: denominator


@dataclass(frozen=True)
class BleuResult:
    score: float  # corpus BLEU-max_n (BLEU-4 by default)
    bleu_n: list[float]  # corpus BLEU-1 .. BLEU-max_n
    per_sentence: list[float]  # BLEU-max_n of each candidate alone


@dataclass(frozen=True)
class _Stats:
    cand_len: int
    ref_len: int  # closest reference length
    matches: list[int]  # clipped n-gram matches, n = 1..max_n
    guesses: list[int]  # candidate n-grams, n = 1..max_n


def bleu(
    candidates: Sequence[Text],
    references: Sequence[Sequence[Text]],
    *,
    tokenize: str = "char",
    max_n: int = 4,
) -> BleuResult:
    """Corpus and per-sentence BLEU of ``candidates[i]`` against ``references[i]``."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every image needs at least one reference caption")
    stats = [
        _sentence_stats(as_tokens(c, tokenize), [as_tokens(r, tokenize) for r in refs], max_n)
        for c, refs in zip(candidates, references, strict=True)
    ]
    per_sentence = [_bleu_from_stats(s, max_n)[-1] for s in stats]
    corpus = _Stats(
        cand_len=sum(s.cand_len for s in stats),
        ref_len=sum(s.ref_len for s in stats),
        matches=[sum(s.matches[k] for s in stats) for k in range(max_n)],
        guesses=[sum(s.guesses[k] for s in stats) for k in range(max_n)],
    )
    bleu_n = _bleu_from_stats(corpus, max_n) if stats else [0.0] * max_n
    return BleuResult(score=bleu_n[-1], bleu_n=bleu_n, per_sentence=per_sentence)


def _sentence_stats(cand: list[str], refs: list[list[str]], max_n: int) -> _Stats:
    max_ref_counts: Counter = Counter()
    for ref in refs:
        max_ref_counts |= ngram_counts(ref, max_n)  # | keeps the max count per n-gram
    matches = [0] * max_n
    for ngram, count in ngram_counts(cand, max_n).items():
        matches[len(ngram) - 1] += min(count, max_ref_counts[ngram])
    closest = min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    guesses = [max(0, len(cand) - k + 1) for k in range(1, max_n + 1)]
    return _Stats(cand_len=len(cand), ref_len=closest, matches=matches, guesses=guesses)


def _bleu_from_stats(stats: _Stats, max_n: int) -> list[float]:
    """BLEU-1..max_n: running geometric mean of smoothed precisions times the brevity penalty."""
    scores, product = [], 1.0
    for k in range(max_n):
        product *= (stats.matches[k] + _TINY) / (stats.guesses[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (stats.cand_len + _TINY) / (stats.ref_len + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores
