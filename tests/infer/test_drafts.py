"""Draft sources for speculative decoding: n-gram lookup in the request, then in earlier replies
of its cache scope; the reply history's bounds; the engine drafts from its history only within a
scope, and its outputs stay plain greedy's."""

from __future__ import annotations

import pytest
import torch

from seechat.infer import engine as engine_module
from seechat.infer.drafts import SEPARATOR, ReplyHistory, ngram_drafts, token_text
from seechat.infer.engine import Engine, EngineConfig
from seechat.infer.sampling import SamplingParams
from seechat.model import load
from tests.infer.test_engine import CONVERSATIONS, _prompt

IMAGE = 99


def test_drafts_follow_the_latest_earlier_occurrence_of_the_longest_ngram():
    h = token_text([1, 2, 3, 4, 5, 9, 3, 4, 7, 2, 3, 4])
    # [2, 3, 4] occurs at 1 (then 5 9 3 4); [3, 4] alone would also match later, at 6 (then 7):
    # the longest n-gram wins, and its latest earlier occurrence
    assert ngram_drafts(h, 3, IMAGE, sizes=(3, 2)) == ([5, 9, 3], False)
    assert ngram_drafts(h, 3, IMAGE, sizes=(2,)) == ([7, 2, 3], False)
    assert ngram_drafts(h, 0, IMAGE) == ([], False)
    assert ngram_drafts(token_text([1, 2, 3]), 4, IMAGE) == ([], False)  # nothing repeats


def test_drafts_fall_back_to_earlier_replies_and_stop_at_a_reply_or_an_image():
    h = token_text([10, 11, 12, 20, 21])
    replies = SEPARATOR + token_text([5, 20, 21, 22, 23]) + SEPARATOR + token_text([20, 21, 24])
    assert ngram_drafts(h, 4, IMAGE) == ([], False)
    # the latest earlier occurrence of [20, 21] in the replies ends one reply: its continuation is
    # the next reply's start, never drafted across, so the previous occurrence drafts
    assert ngram_drafts(h, 4, IMAGE, replies) == ([24], True)
    assert ngram_drafts(h, 4, IMAGE, replies[: replies.rindex(SEPARATOR)]) == ([22, 23], True)
    # the request's own tokens come first
    own = token_text([20, 21, 30, 10, 20, 21])
    assert ngram_drafts(own, 4, IMAGE, replies) == ([30, 10, 20, 21], False)
    image = token_text([20, 21, 30, IMAGE, 31, 20, 21])
    assert ngram_drafts(image, 4, IMAGE) == ([30], False)  # drafts stop before an image token


def test_reply_history_is_bounded_in_tokens_and_scopes():
    history = ReplyHistory(max_tokens=10, max_scopes=2)
    history.add("a", [1, 2, 3, 4])
    history.add("a", [5, 6, 7, 8])
    assert history.text("a") == SEPARATOR + token_text([1, 2, 3, 4]) + SEPARATOR + token_text([5, 6, 7, 8])
    history.add("a", [9, 10, 11])  # 11 tokens: the oldest reply goes
    assert history.text("a") == SEPARATOR + token_text([5, 6, 7, 8]) + SEPARATOR + token_text([9, 10, 11])
    history.add("a", list(range(100, 130)))  # one reply longer than the bound keeps its end
    assert history.text("a") == SEPARATOR + token_text(range(120, 130)) and history.tokens == 10
    history.add("b", [1])
    history.text("a")  # "a" is now the most recently used
    history.add("c", [2])  # a third scope: the least recently used ("b") goes
    assert len(history) == 2 and history.text("b") == "" and history.text("c") == SEPARATOR + chr(2)
    off = ReplyHistory(max_tokens=0)
    off.add("a", [1, 2])
    assert off.text("a") == "" and len(off) == 0


def test_engine_drafts_from_earlier_replies_of_the_same_scope_only(tiny, monkeypatch):
    model, processor = tiny
    long = SamplingParams(max_new_tokens=48)
    monkeypatch.setattr(engine_module, "speculation_pays", lambda *a, **k: True)  # verify every draft
    prompts = [_prompt(processor, k) for k in range(len(CONVERSATIONS))]

    def replies(engine: Engine, scope: str = "") -> list[list[int]]:
        return [
            engine.generate(ids, im, long, cache_prefix=False, ignore_eos=True, cache_scope=scope).token_ids
            for ids, im in prompts
        ]

    with Engine(model, processor, EngineConfig(speculative_tokens=0)) as plain:
        want = replies(plain)
    with Engine(model, processor, EngineConfig(prefix_cache_mb=0)) as spec:
        assert replies(spec, "a") == want
        first = spec.counters["accepted_history_drafts"]
        assert replies(spec, "a") == want  # the same requests again: their earlier replies draft, and land
        again = spec.counters["accepted_history_drafts"]
        assert again > first
        # another scope starts with no history: it drafts exactly as scope "a" did the first time
        assert replies(spec, "b") == want
        assert spec.counters["accepted_history_drafts"] - again == first
        assert len(spec.replies) == 2
    with Engine(model, processor, EngineConfig(prefix_cache_mb=0, draft_history_tokens=0)) as alone:
        assert replies(alone) == want and replies(alone) == want
        assert alone.counters["history_drafts"] == 0 and len(alone.replies) == 0


@pytest.mark.parametrize("speculative_tokens", [0, 4])
def test_no_speculation_keeps_no_reply_history(tiny, speculative_tokens):
    model, processor = tiny
    ids, im = _prompt(processor, 1)
    with Engine(model, processor, EngineConfig(speculative_tokens=speculative_tokens)) as engine:
        engine.generate(ids, im, SamplingParams(max_new_tokens=8), cache_prefix=False)
        assert len(engine.replies) == (1 if speculative_tokens else 0)


def test_sampled_requests_speculate_too_unless_seeded(tiny_ckpt, monkeypatch):
    """An unseeded sampled request verifies drafts by speculative sampling (the exactness of which
    tests/infer/test_sampling.py checks); near temperature 0 that distribution is the greedy one,
    so the plumbing must give the greedy tokens. (The tiny model's added tokens share one output
    row, hence exact ties that sampling may break either way: the rows are made distinct here.)
    A seeded request never speculates: its reply must not depend on when speculation ran."""
    model, processor = load(tiny_ckpt["qwen2"])
    head = model.language_model.get_output_embeddings().weight
    with torch.no_grad():
        head.add_(1e-2 * torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    monkeypatch.setattr(engine_module, "speculation_pays", lambda *a, **k: True)  # verify every draft
    prompts = [_prompt(processor, k) for k in range(len(CONVERSATIONS))]
    greedy = SamplingParams(max_new_tokens=48)
    cold = SamplingParams(max_new_tokens=48, temperature=2e-5)  # sampled, but all mass on the argmax
    with Engine(model, processor, EngineConfig(speculative_tokens=0)) as plain:
        want = [
            plain.generate(ids, im, greedy, cache_prefix=False, ignore_eos=True).token_ids
            for ids, im in prompts
        ]
    with Engine(model, processor, EngineConfig(prefix_cache_mb=0)) as spec:
        got = [
            spec.generate(ids, im, cold, cache_prefix=False, ignore_eos=True).token_ids for ids, im in prompts
        ]
        assert got == want
        assert spec.counters["accepted_drafts"] > 0
        seen = spec.counters["draft_tokens"]
        ids, im = prompts[1]
        for seed in (3, 3):
            hot = SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed)
            spec.generate(ids, im, hot, cache_prefix=False)
        assert spec.counters["draft_tokens"] == seen


def test_a_verify_step_whose_sampling_fails_finishes_its_request_alone(tiny, monkeypatch):
    """Speculative sampling raises (as non-finite logits make it): that request finishes with
    "error", and the engine serves the next request as before."""
    model, processor = tiny
    monkeypatch.setattr(engine_module, "speculation_pays", lambda *a, **k: True)  # verify every draft

    def broken(*args, **kwargs):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0")

    monkeypatch.setattr(engine_module, "speculative_sample", broken)
    ids, im = _prompt(processor, 1)
    greedy = SamplingParams(max_new_tokens=48)
    with Engine(model, processor, EngineConfig(speculative_tokens=0)) as plain:
        want = plain.generate(ids, im, greedy, cache_prefix=False, ignore_eos=True).token_ids
    with Engine(model, processor, EngineConfig(prefix_cache_mb=0)) as spec:
        cold = SamplingParams(max_new_tokens=48, temperature=2e-5)  # sampled; repeats itself as greedy does
        events = list(spec.stream(ids, im, cold, cache_prefix=False, ignore_eos=True))
        assert events[-1].finish_reason == "error" and "sampling failed" in events[-1].error
        assert spec.generate(ids, im, greedy, cache_prefix=False, ignore_eos=True).token_ids == want
