"""CIDEr-D and BLEU against values worked out by hand (coco-caption's definitions).

Notation: N = number of images, L = log(N). An n-gram found in the references of df images has
idf = L - log(max(df, 1)); every n-gram below appears in the references of at most one image, so
each weight is tf * L and L cancels in the cosines. CIDEr-D per image = 10 * mean over n = 1..4
of sum over refs of clipped-cosine * exp(-delta^2 / 72) / number of refs, where delta is the
difference of the bigram counts of candidate and reference (coco-caption's "length").
"""

from __future__ import annotations

import math

import pytest

from seechat.eval.bleu import bleu
from seechat.eval.cider import cider_d


def test_cider_identical_and_half_overlapping():
    # Image 1: candidate = reference "a b": cosine 1 for 1-grams and 2-grams, 3/4-grams empty (0).
    #   -> 10 * (1 + 1 + 0 + 0) / 4 = 5.0
    # Image 2: "c e" vs "c d": 1-grams {c:L, e:L}·{c:L, d:L} = L^2 over (sqrt2 L)^2 -> 0.5; 2-grams 0.
    #   -> 10 * 0.5 / 4 = 1.25
    result = cider_d([["a", "b"], ["c", "e"]], [[["a", "b"]], [["c", "d"]]])
    assert result.per_image == pytest.approx([5.0, 1.25])
    assert result.score == pytest.approx(3.125)


def test_cider_clips_candidate_counts():
    # Image 1: "a a" vs "a b". 1-grams: cand {a: 2L} (norm 2L), ref {a: L, b: L} (norm sqrt2 L);
    #   clipped dot = min(2L, L) * L = L^2 -> cosine 1 / (2 sqrt2). 2-gram (a,a) is not in the ref.
    #   Bigram counts 1 and 1: no length penalty. -> 10 * (1 / (2 sqrt2)) / 4
    # Image 2: "x" vs "y": nothing shared -> 0.
    result = cider_d([["a", "a"], ["x"]], [[["a", "b"]], [["y"]]])
    expected = 10 * (1 / (2 * math.sqrt(2))) / 4
    assert result.per_image == pytest.approx([expected, 0.0])
    assert result.score == pytest.approx(expected / 2)


def test_cider_length_penalty_and_several_references():
    # Image 1: "a b" vs "a b c d". 1-grams: 2L^2 / (sqrt2 L * 2L) = 1/sqrt2; 2-grams: (a,b) is one of
    #   three ref bigrams: L^2 / (L * sqrt3 L) = 1/sqrt3. Bigram counts 1 vs 3: delta = -2,
    #   penalty exp(-4 / 72). -> 10 * (1/sqrt2 + 1/sqrt3) * exp(-1/18) / 4
    # Image 2: "z" vs refs ["y"], ["z"]: 0 for the first ref, cosine 1 (1-grams) for the second;
    #   divided by 2 refs. -> 10 * 1 / 4 / 2 = 1.25
    result = cider_d([["a", "b"], ["z"]], [[["a", "b", "c", "d"]], [["y"], ["z"]]])
    first = 10 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) * math.exp(-1 / 18) / 4
    assert result.per_image == pytest.approx([first, 1.25])


def test_cider_shared_ngrams_get_zero_idf():
    # "a" is in the references of both images: idf = log 2 - log 2 = 0, so it contributes nothing.
    # Candidate "a b" vs ref "a b": 1-gram vectors {a: 0, b: L} on both sides -> cosine 1; bigram
    # (a,b) only in image 1 -> cosine 1. Image 2: "a" vs "a c": all-zero candidate vector -> 0.
    result = cider_d([["a", "b"], ["a"]], [[["a", "b"]], [["a", "c"]]])
    assert result.per_image == pytest.approx([5.0, 0.0])


def test_cider_tokenises_chinese_strings_by_character():
    chars = cider_d(["红色的圆形", "蓝色方块"], [["红色圆形"], ["蓝色的方块"]])
    tokens = cider_d([list("红色的圆形"), list("蓝色方块")], [[list("红色圆形")], [list("蓝色的方块")]])
    assert chars.per_image == pytest.approx(tokens.per_image)


def test_bleu_clipping_brevity_and_corpus_sums():
    cand1, refs1 = "a a b c d e".split(), ["a b c d e".split(), "b c d e f g".split()]
    cand2, refs2 = "b c d".split(), ["b c d e f".split(), "a b c d e f g".split()]
    # Sentence 1 (6 tokens; closest ref length 6, no brevity penalty):
    #   1-grams: a appears twice but at most once in any ref -> 5/6; 2-grams ab bc cd de -> 4/5;
    #   3-grams abc bcd cde -> 3/4; 4-grams abcd bcde -> 2/3.  BLEU-4 = (5/6*4/5*3/4*2/3)^(1/4)
    s1 = (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    # Sentence 2 (3 tokens; closest ref length 5 -> BP = exp(1 - 5/3)): precisions 3/3, 2/2, 1/1,
    #   and 0 4-grams guessed: coco-caption's smoothing gives (0 + 1e-15) / (0 + 1e-9) = 1e-6.
    s2 = (1e-6) ** 0.25 * math.exp(1 - 5 / 3)
    # Corpus: matches 8/9, 6/7, 4/5, 2/3; lengths 9 vs 6 + 5 = 11 -> BP = exp(1 - 11/9).
    corpus4 = (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25 * math.exp(1 - 11 / 9)
    corpus1 = 8 / 9 * math.exp(1 - 11 / 9)
    result = bleu([cand1, cand2], [refs1, refs2])
    assert result.per_sentence == pytest.approx([s1, s2], rel=1e-6)
    assert result.score == pytest.approx(corpus4, rel=1e-6)
    assert result.bleu_n[0] == pytest.approx(corpus1, rel=1e-6)


def test_bleu_closest_reference_length_ties_go_to_the_shorter():
    # Candidate of 4 tokens, refs of 3 and 5 tokens: both 1 away; the shorter (3) is used, so no
    # brevity penalty and BLEU-1 = 2/4 (a, b match).
    result = bleu([["a", "b", "x", "y"]], [[["a", "b", "c"], ["a", "b", "c", "d", "e"]]], max_n=1)
    assert result.score == pytest.approx(0.5)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        cider_d(["a"], [])
    with pytest.raises(ValueError):
        bleu(["a"], [[]])
