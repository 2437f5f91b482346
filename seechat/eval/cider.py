"""CIDEr-D for Chinese captions, computed exactly as coco-caption's ``Cider`` scorer.

What this module is: a dependency-free re-implementation of ``pycocoevalcap/cider`` (which is
CIDEr-D): n-grams n = 1..4, TF-IDF vectors whose document frequencies are counted over the
*references of the evaluated corpus* and whose IDF uses log(number of images), candidate TF-IDF
values clipped against each reference, a gaussian length penalty with sigma = 6, cosine averaged
over n and over references, times 10. Texts are tokenised with ``seechat.eval.normalize`` ("char" by
default, or "jieba"); lists of tokens are used as given.

What it is not: CIDEr with a fixed IDF from a training corpus (scores here depend on the corpus
being evaluated, as in coco-caption), and not the original CIDEr without the -D changes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from seechat.eval.normalize import as_tokens, ngram_counts

__all__ = ["CiderResult", "cider_d"]

Text = str | Sequence[str]  # a caption, or its tokens


@dataclass(frozen=True)
class CiderResult:
    score: float  # corpus CIDEr-D: mean of per_image
    per_image: list[float]


@dataclass(frozen=True)
class _Vector:
    tfidf: list[dict[tuple[str, ...], float]]  # one dict per n
    norms: list[float]
    length: int  # coco-caption counts bigrams here, see _vectorize


def cider_d(
    candidates: Sequence[Text],
    references: Sequence[Sequence[Text]],
    *,
    tokenize: str = "char",
    max_n: int = 4,
    sigma: float = 6.0,
) -> CiderResult:
    """CIDEr-D of ``candidates[i]`` against ``references[i]`` (one or more captions per image)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every image needs at least one reference caption")
    cand_counts = [ngram_counts(as_tokens(c, tokenize), max_n) for c in candidates]
    ref_counts = [[ngram_counts(as_tokens(r, tokenize), max_n) for r in refs] for refs in references]
    doc_freq = _document_frequency(ref_counts)
    log_num_images = math.log(float(len(candidates))) if candidates else 0.0
    per_image = []
    for cand, refs in zip(cand_counts, ref_counts, strict=True):
        vec = _vectorize(cand, doc_freq, log_num_images, max_n)
        total = [0.0] * max_n
        for ref in refs:
            sims = _similarity(vec, _vectorize(ref, doc_freq, log_num_images, max_n), sigma)
            total = [t + s for t, s in zip(total, sims, strict=True)]
        per_image.append(sum(total) / max_n / len(refs) * 10.0)
    score = sum(per_image) / len(per_image) if per_image else 0.0
    return CiderResult(score=score, per_image=per_image)


def _document_frequency(ref_counts: list[list[Counter]]) -> Counter:
    """Number of images whose references contain each n-gram at least once."""
    df: Counter = Counter()
    for refs in ref_counts:
        df.update({ngram for ref in refs for ngram in ref})
    return df


def _vectorize(counts: Counter, doc_freq: Counter, log_num_images: float, max_n: int) -> _Vector:
    tfidf: list[dict[tuple[str, ...], float]] = [{} for _ in range(max_n)]
    norms = [0.0] * max_n
    length = 0
    for ngram, tf in counts.items():
        n = len(ngram) - 1
        # An n-gram absent from every reference gets df = 1, i.e. log(df) = 0, as in coco-caption.
        value = float(tf) * (log_num_images - math.log(max(1.0, doc_freq[ngram])))
        tfidf[n][ngram] = value
        norms[n] += value * value
        if n == 1:  # coco-caption's length is the bigram count (= words - 1); kept for exact scores
            length += tf
    return _Vector(tfidf, [math.sqrt(x) for x in norms], length)


def _similarity(cand: _Vector, ref: _Vector, sigma: float) -> list[float]:
    """Clipped cosine per n, times the gaussian length penalty (CIDEr-D)."""
    penalty = math.exp(-((cand.length - ref.length) ** 2) / (2 * sigma**2))
    sims = []
    for n, (cand_n, ref_n) in enumerate(zip(cand.tfidf, ref.tfidf, strict=True)):
        dot = sum(
            min(value, ref_n.get(ngram, 0.0)) * ref_n.get(ngram, 0.0) for ngram, value in cand_n.items()
        )
        if cand.norms[n] != 0 and ref.norms[n] != 0:
            dot /= cand.norms[n] * ref.norms[n]
        sims.append(dot * penalty)
    return sims
