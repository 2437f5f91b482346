"""CLIPScore and RefCLIPScore formulas on hand-made embeddings."""

from __future__ import annotations

import pytest
import torch

from seechat.eval.clipscore import clip_score, ref_clip_score


def test_clip_score_is_weighted_clipped_cosine():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    texts = torch.tensor([[0.6, 0.8], [-1.0, 0.0], [3.0, 4.0]])  # cos 0.6, -1 (-> 0), 0.6 (unnormalised)
    assert clip_score(images, texts).tolist() == pytest.approx([1.5, 0.0, 1.5])


def test_ref_clip_score_is_the_harmonic_mean():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.6, 0.8], [0.6, 0.8], [1.0, 0.0]])
    refs = [
        torch.tensor([[0.0, 1.0], [1.0, 0.0]]),  # cos 0.8 and 0.6 -> best 0.8
        torch.tensor([[-0.6, -0.8]]),  # cos -1 -> 0: harmonic mean 0
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),  # image term 0 (cos 0) -> 0
    ]
    # item 0: CLIP-S = 2.5 * 0.6 = 1.5; H = 2 * 1.5 * 0.8 / (1.5 + 0.8)
    expected = [2 * 1.5 * 0.8 / 2.3, 0.0, 0.0]
    assert ref_clip_score(images, texts, refs).tolist() == pytest.approx(expected)


def test_ref_clip_score_needs_references():
    with pytest.raises(ValueError):
        ref_clip_score(torch.ones(1, 2), torch.ones(1, 2), [torch.zeros(0, 2)])
