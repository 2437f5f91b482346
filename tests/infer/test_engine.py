"""The engine: same greedy tokens as the reference generator, alone or batched with others;
image features and KV prefixes reused across turns; sampling, stops, cancellation and limits."""

from __future__ import annotations

import time

import pytest
import torch

from seechat.infer import engine as engine_module
from seechat.infer.chat import ChatSession, prompt_ids
from seechat.infer.engine import (
    Engine,
    EngineConfig,
    QueueFullError,
    RequestError,
    StepTimes,
    speculation_pays,
)
from seechat.infer.generate import generate
from seechat.infer.sampling import SamplingParams
from tests.infer.tiny_engine import coloured, generate_concurrently

GREEDY = SamplingParams(max_new_tokens=12)
CONVERSATIONS = [
    ([{"role": "user", "content": "<image>\n你好"}], 1),
    ([{"role": "user", "content": "<image>\n图里有什么？请描述颜色和形状"}], 1),
    ([{"role": "user", "content": "是什么颜色"}], 0),
    (
        [
            {"role": "system", "content": "你是助手。"},
            {"role": "user", "content": "<image>\n<image>\n比较两张图"},
        ],
        2,
    ),
]


@pytest.fixture(scope="module")
def engine(tiny):
    model, processor = tiny
    with Engine(model, processor, EngineConfig(max_batch_size=4)) as e:
        yield e


def _prompt(processor, k: int):
    messages, n_img = CONVERSATIONS[k % len(CONVERSATIONS)]
    return prompt_ids(processor, messages, n_img), [coloured(k + j) for j in range(n_img)]


@pytest.mark.parametrize("fixture", ["tiny", "tiny_glm"])
def test_greedy_equals_reference_generator(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    with Engine(model, processor) as engine:
        for k in range(len(CONVERSATIONS)):
            ids, images = _prompt(processor, k)
            pixels = processor.preprocess_images(images)
            ref = generate(model, ids[None], None, pixels, GREEDY, processor.stop_token_ids)[0]
            got = engine.generate(ids, images, GREEDY, cache_prefix=False)
            assert got.token_ids == ref
            assert got.text == processor.decode(ref) and got.prompt_tokens == ids.numel()


def test_prompt_ids_equal_the_processor(tiny):
    _, processor = tiny
    for messages, n_img in CONVERSATIONS:
        images = [coloured(j) for j in range(n_img)]
        assert torch.equal(
            prompt_ids(processor, messages, n_img), processor.encode_prompt(messages, images).input_ids
        )
    with pytest.raises(ValueError, match="1 <image> marker"):
        prompt_ids(processor, CONVERSATIONS[0][0], 2)


def test_concurrent_requests_are_batched_and_match_single_runs(engine, tiny):
    _, processor = tiny
    prompts = [_prompt(processor, k) for k in range(8)]
    alone = [engine.generate(ids, images, GREEDY, cache_prefix=False).token_ids for ids, images in prompts]
    steps_before = engine.counters["decode_steps"]
    requests = [  # rows leave at different steps
        (*prompts[j % 8], SamplingParams(max_new_tokens=12 - j % 5)) for j in range(24)
    ]
    results = generate_concurrently(engine, requests)
    for j, got in enumerate(results):
        assert got == alone[j % 8][: 12 - j % 5]
    assert engine.counters["max_running"] > 1  # they really shared decode steps
    assert engine.counters["decode_steps"] - steps_before < sum(len(r) for r in results)


def test_image_features_and_prefix_are_reused_across_turns(tiny):
    model, processor = tiny
    with Engine(model, processor) as engine:
        chat = ChatSession(engine, processor)
        first = chat.ask("图里有什么？", [coloured(0)], GREEDY)
        turn1 = chat.last
        assert engine.counters["images_encoded"] == 1 and turn1.cached_tokens == 0
        second = chat.ask("是什么颜色？", [], GREEDY)
        turn2 = chat.last
        assert engine.counters["images_encoded"] == 1  # the image was not encoded again
        # the whole first turn (prompt + reply) came from the prefix cache
        assert turn2.cached_tokens >= turn1.prompt_tokens + turn1.completion_tokens - 1
        chat.ask("这张呢？", [coloured(1)], GREEDY)  # a second image joins the chat
        assert engine.counters["images_encoded"] == 2 and len(chat.images) == 2
        assert chat.last.cached_tokens >= turn2.prompt_tokens
        assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 3
    # the same second turn without any cache gives the same reply
    plain = EngineConfig(prefix_cache_mb=0, image_cache_entries=0, speculative_tokens=0)
    with Engine(model, processor, plain) as fresh:
        again = ChatSession(fresh, processor)
        assert again.ask("图里有什么？", [coloured(0)], GREEDY) == first
        assert again.ask("是什么颜色？", [], GREEDY) == second
        assert again.last.cached_tokens == 0


@pytest.mark.parametrize("fixture", ["tiny", "tiny_glm"])
def test_speculative_decoding_gives_the_plain_greedy_tokens(fixture, request):
    model, processor = request.getfixturevalue(fixture)
    long = SamplingParams(max_new_tokens=48)
    with (
        Engine(model, processor, EngineConfig(speculative_tokens=0)) as plain,
        Engine(model, processor) as spec,
    ):
        for k in range(len(CONVERSATIONS)):
            ids, images = _prompt(processor, k)
            for ignore_eos in (False, True):
                want = plain.generate(ids, images, long, cache_prefix=False, ignore_eos=ignore_eos)
                got = spec.generate(ids, images, long, cache_prefix=False, ignore_eos=ignore_eos)
                assert got.token_ids == want.token_ids and got.text == want.text
                assert got.finish_reason == want.finish_reason
        assert spec.counters["accepted_drafts"] > 0  # random weights repeat themselves: drafts land
        assert spec.counters["decode_steps"] < plain.counters["decode_steps"]
        assert plain.counters["draft_tokens"] == 0


def test_speculation_turns_off_where_it_does_not_pay(tiny, monkeypatch):
    """The rule: speculate when the request's yield (1 + accepted drafts per verify step) is at
    least the measured cost of a verify step in plain steps. Outputs never change."""
    # the decision itself: a verify step measured at 2 plain steps
    for tokens, seen, speculate in ((1.5, 5, False), (2.0, 5, True), (3.0, 1, False), (3.0, 2, True)):
        assert speculation_pays(tokens, seen, plain=0.010, verify=0.020) is speculate
    assert speculation_pays(1.6, 2, plain=0.010, verify=None)  # before any verify step: the prior, 1.5
    model, processor = tiny
    long = SamplingParams(max_new_tokens=48)
    prompts = [_prompt(processor, k) for k in range(len(CONVERSATIONS))]
    with Engine(model, processor, EngineConfig(speculative_tokens=0)) as plain:
        want = [plain.generate(ids, im, long, cache_prefix=False).token_ids for ids, im in prompts]
    # verify steps far too dear (never measured, so the prior stands): no request speculates, and
    # the shadow drafts still measure the yield that says speculation would have been accepted
    monkeypatch.setattr(engine_module, "SPECULATION_PRIOR_COST", 1e9)
    with Engine(model, processor) as dear:
        assert [dear.generate(ids, im, long, cache_prefix=False).token_ids for ids, im in prompts] == want
        assert dear.counters["draft_tokens"] == 0 and dear.step_seconds["verify"] is None
        assert dear.step_seconds["plain"] > 0


def test_step_times_forget_one_slow_step_once_an_ordinary_one_follows():
    times = StepTimes()
    assert times.estimate() is None
    times.add(5.0)  # the first step hit a pause
    assert times.estimate() == 5.0
    times.add(0.010)
    assert times.estimate() == 0.010
    for t in (0.011, 0.012, 0.013):
        times.add(t)
    assert times.estimate() == 0.012
    times.add(9.0)  # one more pause among ordinary steps moves nothing
    assert times.estimate() == 0.012
    for _ in range(engine_module.STEP_TIME_WINDOW):
        times.add(0.030)  # the machine got slower for good: the estimate follows
    assert times.estimate() == 0.030


def test_a_verify_step_timed_during_a_pause_does_not_turn_speculation_off_for_good(tiny, monkeypatch):
    """Only verify steps time verify steps. If the first one is timed during a pause, the measured
    cost refuses every request, and without probes no verify step would ever run again to correct
    it. Outputs never change."""
    model, processor = tiny
    long = SamplingParams(max_new_tokens=48)
    prompts = [_prompt(processor, k) for k in range(len(CONVERSATIONS))]
    with Engine(model, processor, EngineConfig(speculative_tokens=0)) as plain:
        want = [plain.generate(ids, im, long, cache_prefix=False).token_ids for ids, im in prompts]

    def run(reprobe_steps: int) -> Engine:
        monkeypatch.setattr(engine_module, "SPECULATION_REPROBE_STEPS", reprobe_steps)
        with Engine(model, processor, EngineConfig(prefix_cache_mb=0)) as engine:
            engine.step_times["verify"].add(1000.0)  # the pause
            got = [engine.generate(ids, im, long, cache_prefix=False).token_ids for ids, im in prompts]
            assert got == want
            return engine

    locked = run(reprobe_steps=10**9)  # no probes: the pause decides for the engine's life
    assert locked.counters["draft_tokens"] == 0 and locked.step_seconds["verify"] == 1000.0
    probed = run(reprobe_steps=4)
    assert probed.counters["speculation_probes"] >= 1
    assert probed.step_seconds["verify"] < 1.0  # re-timed
    k = EngineConfig().speculative_tokens  # drafts a probe verifies, at most
    assert probed.counters["draft_tokens"] > k * probed.counters["speculation_probes"]  # it speculates again
    assert probed.counters["accepted_drafts"] > 0


def test_sampling_parameters(engine, tiny):
    _, processor = tiny
    ids, images = _prompt(processor, 1)
    greedy = engine.generate(ids, images, GREEDY, cache_prefix=False)
    top1 = engine.generate(
        ids, images, SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1), cache_prefix=False
    )
    assert top1.token_ids == greedy.token_ids
    hot = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    a, b = (engine.generate(ids, images, hot, cache_prefix=False) for _ in range(2))
    assert a.token_ids == b.token_ids  # seeded sampling is reproducible
    short = engine.generate(ids, images, SamplingParams(max_new_tokens=3), cache_prefix=False)
    assert short.finish_reason == "length" and short.completion_tokens == 3
    penalised = engine.generate(
        ids, images, SamplingParams(max_new_tokens=12, repetition_penalty=5.0), cache_prefix=False
    )
    assert len(set(penalised.token_ids)) >= len(set(greedy.token_ids))


def test_stop_strings_cut_the_text(engine, tiny):
    _, processor = tiny
    ids, images = _prompt(processor, 1)
    full = engine.generate(ids, images, GREEDY, cache_prefix=False).text
    stop = full[4:6]
    events = list(engine.stream(ids, images, GREEDY, stop=[stop], cache_prefix=False))
    text = "".join(e.text for e in events)
    assert text == full[: full.find(stop)] and events[-1].finish_reason == "stop"
    assert all(stop not in e.text for e in events)


def test_cancel_frees_the_slot(engine, tiny):
    _, processor = tiny
    ids, images = _prompt(processor, 0)
    stream = engine.stream(ids, images, SamplingParams(max_new_tokens=400), cache_prefix=False)
    next(stream)
    stream.close()
    deadline = time.monotonic() + 10
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["running"] == 0


def test_limits_and_errors(tiny):
    model, processor = tiny
    ids, images = _prompt(processor, 0)
    with Engine(
        model,
        processor,
        EngineConfig(max_batch_size=1, max_waiting=1, max_model_len=64, max_images_per_request=1),
    ) as engine:
        text_only, _ = _prompt(processor, 2)
        with pytest.raises(RequestError, match="context is 64 tokens"):
            engine.submit(torch.cat([text_only] * 5), [], GREEDY)
        with pytest.raises(RequestError, match="image tokens but 0 image"):
            engine.submit(ids, [], GREEDY)
        with pytest.raises(RequestError, match="at most 1"):
            engine.submit(ids, images * 2, GREEDY)
        long = engine.stream(ids, images, SamplingParams(max_new_tokens=30), cache_prefix=False)
        next(long)  # running: it holds the only batch slot
        queued = engine.stream(ids, images, GREEDY, cache_prefix=False)  # waits
        with pytest.raises(QueueFullError, match="retry later"):
            engine.submit(ids, images, GREEDY)
        assert list(long)[-1].finish_reason == "length"  # the context limit caps the reply
        assert list(queued)[-1].finish_reason in ("stop", "length")
    with Engine(model, processor, EngineConfig(request_timeout_s=0.0)) as engine:
        assert list(engine.stream(ids, images, GREEDY))[-1].finish_reason == "timeout"


def test_a_failing_step_fails_its_requests_only(tiny, monkeypatch):
    model, processor = tiny
    ids, images = _prompt(processor, 0)
    with Engine(model, processor) as engine:
        real = engine.runner.prefill
        calls = []

        def flaky(rows):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return real(rows)

        monkeypatch.setattr(engine.runner, "prefill", flaky)
        last = list(engine.stream(ids, images, GREEDY))[-1]
        assert last.finish_reason == "error" and "boom" in last.error
        assert engine.generate(ids, images, GREEDY).completion_tokens > 0


def test_a_row_whose_sampling_fails_finishes_alone(tiny, monkeypatch):
    """Three requests decoded in one batch; sampling raises for the one with temperature 0.7: it
    finishes with "error", the greedy ones give their exact tokens, the engine carries on."""
    model, processor = tiny
    ids, images = _prompt(processor, 1)
    real = engine_module.sample_next

    def broken_for_one(logits, params, generator=None):
        if params.temperature == 0.7:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample_next", broken_for_one)
    with Engine(model, processor, EngineConfig(speculative_tokens=0)) as engine:
        want = engine.generate(ids, images, GREEDY, cache_prefix=False).token_ids
        with engine._cond:  # nothing is admitted until all three are queued: they share every step
            streams = [
                engine.stream(ids, images, p, cache_prefix=False)
                for p in (GREEDY, SamplingParams(max_new_tokens=12, temperature=0.7), GREEDY)
            ]
        events = [list(s) for s in streams]
        assert engine.counters["max_running"] >= 2
        assert events[1][-1].finish_reason == "error" and "sampling failed" in events[1][-1].error
        for evs in (events[0], events[2]):
            assert [t for e in evs for t in e.token_ids] == want and evs[-1].finish_reason != "error"
        assert engine.generate(ids, images, GREEDY, cache_prefix=False).token_ids == want


def test_queue_byte_budget_and_kv_budget(tiny):
    model, processor = tiny
    ids, images = _prompt(processor, 0)  # one image: 3 x 32 x 32 float pixels
    one = 3 * 32 * 32 * 4 + ids.numel() * 24
    with Engine(model, processor, EngineConfig(max_waiting_bytes=2 * one, max_batch_tokens=1)) as engine:
        assert engine.max_batch_tokens == engine.max_model_len  # a full-length request always fits
        with engine._cond:  # hold the scheduler: requests stay queued
            held = [engine.stream(ids, images, GREEDY, cache_prefix=False) for _ in range(2)]
            assert engine.stats()["waiting_bytes"] == 2 * one
            with pytest.raises(QueueFullError, match="max_waiting_bytes"):
                engine.submit(ids, images, GREEDY)
        assert all(list(s)[-1].finish_reason in ("stop", "length") for s in held)
        assert engine.stats()["waiting_bytes"] == 0


@pytest.mark.parametrize("speculative_tokens", [0, 4])
def test_static_decode_gives_the_plain_greedy_tokens(tiny, speculative_tokens):
    """The static path (slotted KV, fixed-shape step; CUDA graphs on a GPU) run eagerly on the CPU:
    the fast path's greedy tokens, alone and with rows joining and leaving the batch, attention
    over column buckets that grow as the rows do."""
    model, processor = tiny
    long = SamplingParams(max_new_tokens=24)
    prompts = [_prompt(processor, k) for k in range(8)]
    with Engine(model, processor, EngineConfig(speculative_tokens=0, prefix_cache_mb=0)) as plain:
        want = [plain.generate(ids, im, long, cache_prefix=False).token_ids for ids, im in prompts]
    config = EngineConfig(
        static_decode="on", max_batch_size=4, max_model_len=256, speculative_tokens=speculative_tokens
    )
    with Engine(model, processor, config) as static:
        assert static.runner.decode_path == "static"
        assert static.runner.kv_pool_bytes > 0  # allocated by the start's warm-up, before any request
        static.runner.static.min_columns = 16  # attention over column buckets of 32-128 (rows of 30-90)
        alone = [static.generate(ids, im, long, cache_prefix=False).token_ids for ids, im in prompts]
        assert alone == want
        requests = [  # rows leave at different steps
            (*prompts[j % 8], SamplingParams(max_new_tokens=24 - j % 5)) for j in range(12)
        ]
        results = generate_concurrently(static, requests)
        assert results == [want[j % 8][: 24 - j % 5] for j in range(12)]
        assert static.counters["max_running"] > 1
        # multi-turn: the prefix cache hands KV rows out of the slot pool and back
        chat = ChatSession(static, processor)
        first = chat.ask("图里有什么？", [coloured(0)], GREEDY)
        second = chat.ask("是什么颜色？", [], GREEDY)
        assert chat.last.cached_tokens > 0
    with Engine(model, processor, EngineConfig(speculative_tokens=0, prefix_cache_mb=0)) as fresh:
        again = ChatSession(fresh, processor)
        assert again.ask("图里有什么？", [coloured(0)], GREEDY) == first
        assert again.ask("是什么颜色？", [], GREEDY) == second
