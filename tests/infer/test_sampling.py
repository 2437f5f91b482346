"""Sampling (seechat.infer.sampling): safe for every temperature, top-k / top-p keep what they
should, the repetition penalty, seeded determinism."""

from __future__ import annotations

import pytest
import torch

from seechat.infer.sampling import GREEDY_BELOW, SamplingParams, apply_repetition_penalty, sample_next


def test_sampling_is_safe_for_every_temperature():
    logits = torch.tensor([[1e4, 2.0, -3.0, 0.5], [0.0, 0.0, 5.0, 5.0]])
    for t in (5e-324, 1e-300, 1e-40, 1e-6, 1e-5, 1e-3, 0.5, 2.0):
        g = torch.Generator().manual_seed(0)
        out = sample_next(logits.clone(), SamplingParams(temperature=t, top_p=0.9, top_k=3), g)
        assert out[0] == 0 and out[1] in (2, 3)
    with pytest.raises(RuntimeError):  # a model's NaN is not hidden: the engine fails that request alone
        sample_next(torch.tensor([[float("nan"), 1.0]]), SamplingParams(temperature=1.0))


def test_greedy_below_the_threshold_and_top_k_top_p_limit_the_choice():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert sample_next(logits, SamplingParams(temperature=0.0)).tolist() == [1]
    assert sample_next(logits, SamplingParams(temperature=GREEDY_BELOW / 2)).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, SamplingParams(temperature=5.0, top_k=2), g)) for _ in range(200)}
    assert picks == {1, 2}  # a high temperature, but only the two best are allowed
    picks = {int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.01), g)) for _ in range(50)}
    assert picks == {1}  # the token that crosses top_p is kept, nothing after it


def test_seeded_sampling_repeats():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a = [sample_next(logits, params, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])


def test_repetition_penalty_lowers_seen_tokens_either_sign():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    assert apply_repetition_penalty(logits, torch.tensor([[0]]), 1.0) is logits  # 1 = off
