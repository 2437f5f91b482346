"""Sampling (seechat.infer.sampling): safe for every temperature, top-k / top-p keep what they
should, the repetition penalty, seeded determinism."""

from __future__ import annotations

import pytest
import torch

from seechat.infer.sampling import (
    GREEDY_BELOW,
    SamplingParams,
    apply_repetition_penalty,
    next_token_probs,
    sample_next,
    speculative_sample,
)


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


def test_sample_next_draws_from_next_token_probs():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=0.7, top_k=3, top_p=0.95)
    probs = next_token_probs(logits, params)[0]
    assert probs[3] == 0 and probs.sum().item() == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_next(logits, params, gen) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    torch.testing.assert_close(freq, probs.double(), atol=0.03, rtol=0)


def test_speculative_sampling_keeps_plain_sampling_distribution():
    """With a point-mass draft, keep draft i with probability p_i(draft), else draw from p_i without
    it: each token is distributed as plain sampling would draw it, whatever the drafts. Checked
    on the joint distribution of the first two tokens (exact values computed), for a likely, an
    unlikely and an impossible first draft."""
    p0 = torch.tensor([0.5, 0.3, 0.2, 0.0])
    p1 = torch.tensor([0.1, 0.6, 0.2, 0.1])  # the distribution after token 0 if draft 0 is kept
    p2 = torch.tensor([0.25, 0.25, 0.25, 0.25])
    probs = torch.stack([p0, p1, p2])
    gen = torch.Generator().manual_seed(0)
    n = 20000
    for drafts in ([0, 1], [2, 1], [3, 0]):
        first = torch.zeros(4, dtype=torch.float64)
        second_given_draft = torch.zeros(4, dtype=torch.float64)
        for _ in range(n):
            out = speculative_sample(probs, drafts, gen)
            assert 1 <= len(out) <= 3 and out[: len(out) - 1] == drafts[: len(out) - 1]
            first[out[0]] += 1
            if out[0] == drafts[0]:
                second_given_draft[out[1]] += 1
        torch.testing.assert_close(first / n, p0.double(), atol=0.012, rtol=0)
        if drafts[0] != 3:  # given the first draft was kept, the second token follows p1
            got = second_given_draft / second_given_draft.sum()
            torch.testing.assert_close(got, p1.double(), atol=0.03, rtol=0)
