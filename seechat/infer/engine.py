"""The serving engine: continuous batching over a KV cache, with image-feature and prefix caches.

One scheduler thread owns the model. Each iteration it

1. admits waiting requests, first come first served, while three budgets allow: `max_batch_size`
   running requests, `max_prefill_tokens` new tokens per step, and `max_batch_tokens` of KV
   memory (see `kv_peak_tokens`: the batch pads every row to the longest, so a request is admitted
   only if the whole batch, padding included, stays within the budget until every row could have
   finished); encodes the images no earlier request has shown (features cached by pixel content),
   prefills what the prefix cache does not already hold — all admitted requests in one
   left-padded forward — and joins them to the running batch;
2. decodes one token for every running request in one batched forward;
3. samples each row with its own parameters (a row whose sampling fails finishes with "error"
   alone), streams text deltas to each request's sink, and retires finished rows (their KV goes
   to the prefix cache, so the next turn of that chat prefills only the new message).

Requests come in as token ids (image tokens already expanded) plus images and sampling
parameters; they go out as `StreamEvent`s. Images are preprocessed to pixel values on the
submitting thread (never on the scheduler thread), and the waiting queue is bounded in bytes as
well as in requests. The engine knows token ids, images and text pieces, not chat roles or HTTP:
`seechat.infer.chat` renders conversations, `seechat.serve` speaks OpenAI.
Submitting is thread-safe; `stream` (sync) and `astream` (asyncio) wrap `submit`.

Greedy outputs do not depend on what else is in the batch: rows are independent (attention masks
and per-row position ids), which the tests check against single-request runs.

Speculative decoding (n-gram drafts, lossless) runs for a lone request, and only while it pays:
greedy requests get exactly the tokens of plain greedy, sampled ones (unseeded, no repetition
penalty) tokens of exactly plain sampling's distribution (`sampling.speculative_sample`).
Drafts are looked up in the request's own tokens (prompt lookup) and in the engine's recent
replies of the same cache scope (`seechat.infer.drafts`: replies repeat across requests far more
than within one). A verify step feeds the last token and k drafts; it costs `c` plain steps
and gives `1 + a` tokens (`a` drafts accepted), so it is faster exactly when `1 + a > c`. Both
sides are measured, never assumed:

- `c`: the engine times its own batch-1 steps, whole (model step, sampling, detokenising), plain
  and verify, and reads each kind's lower median of its last STEP_TIME_WINDOW steps (`StepTimes`),
  so the rule follows the machine it runs on — on a loaded 2-core CPU a multi-token step can cost
  2-4 plain steps, on an idle one about 1.3 — and the model; before the first verify step is
  timed, c = SPECULATION_PRIOR_COST. Only verify steps time verify steps, so a refused request
  whose yield would pay at the prior runs one anyway after SPECULATION_REPROBE_STEPS plain steps
  without one (a probe): a verify time taken during a pause cannot turn speculation off for good;
- `1 + a`: per request, a moving average over its verify steps and, while it does not speculate,
  over *shadow* drafts: drafts proposed and checked against the tokens the plain steps then
  produce, at no model cost (greedy is deterministic, so that is what a verify step would have
  accepted; a sampled token equals the draft with probability p(draft), the probability a verify
  step keeps it, so for sampling the estimate is unbiased).

A request speculates once it has SPECULATION_MIN_SEEN observations and its average yield is at
least c; it stops when the average falls below c, and starts again if its text turns repetitive.
A low-acceptance request thus decodes plainly after its first few drafts instead of paying for
rejected ones on every step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from seechat.data.processor import SeeChatProcessor
from seechat.infer.drafts import ReplyHistory, ngram_drafts, token_text
from seechat.infer.images import ImageFeatureCache, key_tag, pixel_key
from seechat.infer.kv import BatchKV, Layers, PrefixCache, SlotKV, kv_peak_tokens
from seechat.infer.request import (
    Completion,
    Request,
    StopStrings,
    StreamEvent,
    note_yield,
    plain_greedy,
    resolve_shadows,
    shadow_drafts,
    speculable,
)
from seechat.infer.runner import ModelRunner, PrefillRow
from seechat.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    next_token_probs,
    sample_next,
    speculative_sample,
)
from seechat.model.modeling import SeeChatModel

log = logging.getLogger(__name__)

SPECULATION_PRIOR_COST = 1.5  # verify step / plain step, until measured (mini model, 1 idle thread: ~1.35)
SPECULATION_MIN_SEEN = 2  # yield observations a request needs before it may speculate
STEP_TIME_WINDOW = 9  # recent batch-1 step times kept per kind; the rule reads their lower median
SPECULATION_REPROBE_STEPS = 64  # lone plain steps without a verify step before a refused request probes


def speculation_pays(tokens: float, seen: int, plain: float | None, verify: float | None) -> bool:
    """The rule in the module docstring: a request whose verify steps give `tokens` tokens on
    average (over `seen` observations) speculates when that is at least the cost of a verify step
    in plain steps (`verify` / `plain` seconds, measured; the prior until both are)."""
    cost = verify / plain if plain and verify else SPECULATION_PRIOR_COST
    return seen >= SPECULATION_MIN_SEEN and tokens >= cost


class StepTimes:
    """The recent batch-1 step times of one kind (plain or verify), in seconds. Noise on a wall
    clock only ever adds time (a busy core, a GC pause, a page fault), so the estimate is the lower
    median of the last STEP_TIME_WINDOW, not a mean: one slow step, even the first, stops counting
    as soon as one ordinary step follows it."""

    def __init__(self):
        self._recent: deque[float] = deque(maxlen=STEP_TIME_WINDOW)

    def add(self, seconds: float) -> None:
        self._recent.append(seconds)

    def estimate(self) -> float | None:
        return statistics.median_low(self._recent) if self._recent else None


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # requests decoded together
    max_waiting: int = 256  # admitted but not yet running; beyond this, submit raises QueueFullError
    max_waiting_bytes: int = (
        256 << 20
    )  # bytes the waiting requests may hold (pixels, ids); beyond: QueueFullError
    max_prefill_tokens: int = 4096  # new tokens prefilled per step (at least one request always)
    max_batch_tokens: int = (
        65536  # KV tokens of the running batch, padding included (raised to max_model_len)
    )
    max_model_len: int = 0  # prompt + reply tokens; 0 = the language model's own limit
    max_images_per_request: int = 16
    image_cache_entries: int = 256
    prefix_cache_mb: int = 256  # 0 = no prefix reuse
    request_timeout_s: float = 600.0  # from submit to the last token
    fast_decode: str = "auto"  # "auto" | "on" | "off": the fast decode step (see seechat.infer.runner)
    static_decode: str = "auto"  # "auto" (CUDA only) | "on" | "off": slotted KV + CUDA-graph decode (runner)
    compile_decode: bool = False  # torch.compile the static step's layers (static_decode.StaticDecoder)
    speculative_tokens: int = 4  # n-gram drafts per verify step, lone request, while it pays; 0 = off
    draft_history_tokens: int = 65536  # earlier replies' tokens drafts come from, per cache scope; 0 = none
    warm_up: bool = True  # static path: KV pool and CUDA graphs (or the compile) at start, not at requests


class RequestError(ValueError):
    """The request cannot be served as given (too long, image count mismatch ...)."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


class EngineClosedError(RuntimeError):
    """The engine is shut down or shutting down, or its scheduler thread has stopped."""


class RequestHandle:
    def __init__(self, engine: Engine, request: Request):
        self._engine = engine
        self._request = request

    @property
    def id(self) -> str:
        return self._request.id

    def cancel(self) -> None:
        """Stop generating; the request finishes with "abort" at the next step."""
        self._request.cancelled = True
        self._engine._wake()


class AsyncEvents:
    """The events of one request for an asyncio consumer (see `Engine.astream`)."""

    def __init__(self, handle: RequestHandle, q: asyncio.Queue[StreamEvent]):
        self.handle = handle
        self._q = q
        self.finished = False

    def __aiter__(self) -> AsyncEvents:
        return self

    async def __anext__(self) -> StreamEvent:
        if self.finished:
            raise StopAsyncIteration
        ev = await self._q.get()
        self.finished = ev.finish_reason is not None
        return ev

    def cancel(self) -> None:
        if not self.finished:
            self.handle.cancel()


class Engine:
    def __init__(
        self, model: SeeChatModel, processor: SeeChatProcessor, config: EngineConfig = EngineConfig()
    ):
        self.model = model.eval()
        self.processor = processor
        self.config = config
        self.runner = ModelRunner(
            model,
            processor.tokenizer.pad_token_id,
            config.fast_decode,
            config.static_decode,
            slots=config.max_batch_size,
            capacity=config.max_model_len,
            compile_decode=config.compile_decode,
        )
        self.max_model_len = config.max_model_len or self.runner.max_positions()
        self.max_batch_tokens = max(
            config.max_batch_tokens, self.max_model_len
        )  # one full request always fits
        self.stop_token_ids = list(processor.stop_token_ids)
        self.image_token_id = model.image_token_id
        self.image_cache = ImageFeatureCache(config.image_cache_entries)
        self.prefix_cache = PrefixCache(config.prefix_cache_mb << 20)
        self.replies = ReplyHistory(config.draft_history_tokens if config.speculative_tokens else 0)
        self.counters = dict.fromkeys(
            (
                "requests",
                "prefill_steps",
                "prefill_tokens",
                "cached_tokens",
                "decode_steps",
                "decode_tokens",
                "images_encoded",
                "max_running",
                "aborted",
                "failed",
                "draft_tokens",
                "accepted_drafts",
                "history_drafts",
                "accepted_history_drafts",
                "speculation_probes",
                "peak_kv_tokens",
            ),
            0,
        )
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._waiting_bytes = 0
        self._running: list[Request] = []
        self._kv: BatchKV | SlotKV | None = None
        self._ids = itertools.count()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.step_times = {"plain": StepTimes(), "verify": StepTimes()}  # batch-1 steps
        self._plain_since_verify = 0  # lone plain steps since the last verify step
        self.warm_up_report = ""  # what `start` warmed up (the static path), for the log

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        """Start the scheduler thread; first, on the static decode path (`warm_up`), allocate its KV
        pool and capture every decode graph the config can need (`ModelRunner.warm_up`)."""
        if self._thread is None:
            if self.config.warm_up:
                self.warm_up_report = self.runner.warm_up(self.decode_shapes())
                if self.warm_up_report:
                    log.info(self.warm_up_report)
            self._thread = threading.Thread(target=self._loop, name="seechat-engine", daemon=True)
            self._thread.start()
        return self

    def decode_shapes(self) -> list[tuple[int, int]]:
        """(most rows, new tokens) of every decode step this engine can run: one token for up to
        `max_batch_size` rows, and a lone request's verify steps of 1 + 1..`speculative_tokens`."""
        k = self.config.speculative_tokens
        return [(self.config.max_batch_size, 1), *((1, 1 + d) for d in range(1, k + 1))]

    @property
    def alive(self) -> bool:
        """True while the scheduler thread runs and the engine is not shutting down: requests
        submitted now will be served."""
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def close(self) -> None:
        """Finish waiting and running requests with "abort" and stop the scheduler thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        with self._cond:
            running, waiting, waiting_bytes = len(self._running), len(self._waiting), self._waiting_bytes
            kv = self._kv
        return {
            **self.counters,
            "running": running,
            "waiting": waiting,
            "waiting_bytes": waiting_bytes,
            "kv_tokens": 0 if kv is None else kv.batch_size * kv.length,
            "max_batch_tokens": self.max_batch_tokens,
            "image_cache_hits": self.image_cache.hits,
            "image_cache_entries": len(self.image_cache),
            "prefix_cache_entries": len(self.prefix_cache),
            "prefix_cache_bytes": self.prefix_cache.bytes,
        }

    # ------------------------------------------------------------------ submitting

    def submit(
        self,
        input_ids: torch.Tensor | Sequence[int],
        images: Sequence[Image.Image] | torch.Tensor = (),
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        sink: Callable[[StreamEvent], None] | None = None,
        cache_prefix: bool = True,
        ignore_eos: bool = False,
        cache_scope: str = "",
    ) -> RequestHandle:
        """Queue a request; `sink` receives its events on the engine thread (keep it quick).
        `images`: PIL images (preprocessed here, on the caller's thread) or their pixel values
        (n, 3, H, W) from `processor.preprocess_images`.
        `cache_prefix`: keep its KV for later requests that share the prefix (chat turns).
        `ignore_eos`: generate exactly max_new_tokens (benchmarks); stop strings still apply.
        `cache_scope`: prefix KV and image features are shared only between requests of one scope
        (the server passes one per API key)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).flatten().cpu()
        n_tok = self.model.num_image_tokens
        if ids.numel() == 0:
            raise RequestError("the prompt is empty")
        n_img = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        if n_img > self.config.max_images_per_request:
            raise RequestError(
                f"{n_img} images in one request; this server accepts at most "
                f"{self.config.max_images_per_request}"
            )
        is_image = ids == self.image_token_id
        if int(is_image.sum()) != n_img * n_tok:
            raise RequestError(
                f"the prompt has {int(is_image.sum())} image tokens but {n_img} image(s) x {n_tok} tokens "
                "were expected; expand each <image> marker with the processor"
            )
        if ids.numel() >= self.max_model_len:
            raise RequestError(
                f"the prompt is {ids.numel()} tokens ({n_img} image(s) x {n_tok} tokens included); the "
                f"model's context is {self.max_model_len} tokens, which leaves no room for a reply"
            )
        try:
            generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
        except (ValueError, RuntimeError, OverflowError, TypeError):
            raise RequestError(
                f"seed {params.seed} is out of range: use an integer in [-2**63, 2**64)"
            ) from None
        pixels = self._pixels(images)
        keys = [] if pixels is None else [pixel_key(p, cache_scope) for p in pixels]
        content = ids.clone()
        if keys:
            tags = torch.tensor([key_tag(k) for k in keys], dtype=torch.long).repeat_interleave(n_tok)
            content[is_image] = tags
        now = time.monotonic()
        req = Request(
            id=f"req-{next(self._ids)}",
            input_ids=ids,
            pixel_values=pixels,
            image_keys=keys,
            content_key=content,
            params=params,
            stops=StopStrings(stop),
            stop_ids=frozenset() if ignore_eos else frozenset(self.stop_token_ids),
            max_new=max(0, min(params.max_new_tokens, self.max_model_len - ids.numel())),
            sink=sink or (lambda ev: None),
            deadline=now + self.config.request_timeout_s,
            cache_prefix=cache_prefix,
            cache_scope=cache_scope,
            generator=generator,
            nbytes=(0 if pixels is None else pixels.numel() * pixels.element_size()) + ids.numel() * 8 * 3,
            history=token_text(ids.tolist()),
        )
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is shutting down")
            if self._thread is not None and not self._thread.is_alive():
                raise EngineClosedError("the engine's scheduler thread has stopped; restart the server")
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting "
                    f"(max_waiting={self.config.max_waiting}); retry later"
                )
            if self._waiting and self._waiting_bytes + req.nbytes > self.config.max_waiting_bytes:
                raise QueueFullError(
                    f"the waiting requests already hold {self._waiting_bytes:,} bytes "
                    f"and this one {req.nbytes:,} "
                    f"(max_waiting_bytes={self.config.max_waiting_bytes:,}); retry later"
                )
            self._waiting.append(req)
            self._waiting_bytes += req.nbytes
            self.counters["requests"] += 1
            if self._thread is None:
                self.start()
            self._cond.notify_all()
        return RequestHandle(self, req)

    def _pixels(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor | None:
        """Pixel values (n, 3, H, W), computed on the caller's thread; None for no images."""
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise RequestError(f"pixel values must be (n, 3, H, W), got shape {tuple(images.shape)}")
            return images.cpu() if images.shape[0] else None
        return self.processor.preprocess_images(list(images)) if len(images) else None

    def stream(
        self,
        input_ids,
        images=(),
        params=SamplingParams(),
        stop=(),
        cache_prefix=True,
        ignore_eos=False,
        cache_scope: str = "",
    ) -> Iterator[StreamEvent]:
        """Submit now (errors raise here) and return the request's events as they come (blocking).
        Closing the iterator early cancels the request."""
        q: queue.Queue[StreamEvent] = queue.Queue()
        handle = self.submit(input_ids, images, params, stop, q.put, cache_prefix, ignore_eos, cache_scope)

        def events() -> Iterator[StreamEvent]:
            finished = False
            try:
                while not finished:
                    ev = q.get()
                    finished = ev.finish_reason is not None
                    yield ev
            finally:
                if not finished:
                    handle.cancel()

        return events()

    def astream(
        self,
        input_ids,
        images=(),
        params=SamplingParams(),
        stop=(),
        cache_prefix=True,
        loop: asyncio.AbstractEventLoop | None = None,
        ignore_eos: bool = False,
        cache_scope: str = "",
    ) -> AsyncEvents:
        """Submit now (errors such as QueueFullError raise here) and return an async iterator of the
        request's events, delivered through `loop` (default: the running loop). Call its `cancel()`
        when the consumer goes away (a client disconnect) to free the batch slot."""
        loop = loop or asyncio.get_running_loop()
        q: asyncio.Queue[StreamEvent] = asyncio.Queue()
        handle = self.submit(
            input_ids,
            images,
            params,
            stop,
            lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev),
            cache_prefix,
            ignore_eos,
            cache_scope,
        )
        return AsyncEvents(handle, q)

    def generate(
        self,
        input_ids,
        images=(),
        params=SamplingParams(),
        stop=(),
        cache_prefix=True,
        ignore_eos=False,
        cache_scope: str = "",
    ) -> Completion:
        """The whole reply of one request (blocking)."""
        parts, ids, last = [], [], StreamEvent()
        for ev in self.stream(input_ids, images, params, stop, cache_prefix, ignore_eos, cache_scope):
            parts.append(ev.text)
            ids.extend(ev.token_ids)
            last = ev
        if last.finish_reason == "error":
            raise RuntimeError(last.error)
        return Completion(
            "".join(parts),
            ids,
            last.finish_reason,
            last.prompt_tokens,
            last.completion_tokens,
            last.cached_tokens,
        )

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ the scheduler

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        group: list[Request] = []
        reason, error = "abort", "the engine shut down"
        try:
            while True:
                group = []
                try:
                    with self._cond:
                        while not self._closing and not self._waiting and not self._running:
                            self._cond.wait()
                        if self._closing:
                            break
                        group = self._admit()
                    with torch.inference_mode():
                        self._step(group)
                except Exception as e:  # never let one bad batch take the server down
                    log.exception("engine step failed")
                    for r in group + self._running:
                        self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                    self._running, self._kv = [], None
        except BaseException as e:  # the thread is dying: nobody may wait for it forever
            reason, error = "error", f"the engine stopped ({type(e).__name__}: {e})"
            raise
        finally:
            with self._cond:
                doomed = group + list(self._waiting) + self._running
                self._waiting.clear()
                self._waiting_bytes = 0
            for r in doomed:
                self._finish(r, reason, error=error)
            self._running, self._kv = [], None

    def _pop_waiting(self) -> Request:
        r = self._waiting.popleft()
        self._waiting_bytes -= r.nbytes
        return r

    def _admit(self) -> list[Request]:
        """Under the lock: waiting requests that join this step, first come first served, while the
        batch size, prefill and KV budgets allow (cancelled or late ones finish). The prefix cache
        is consulted here (only this thread touches it), so the KV budget sees the real layout."""
        group: list[Request] = []
        budget = self.config.max_prefill_tokens
        now = time.monotonic()
        width = 0 if self._kv is None else self._kv.length
        remaining = [r.max_new - len(r.generated) for r in self._running]
        pmax = smax = 0  # the group's prefill layout: reused prefixes and new suffixes, each left-padded
        try:
            while self._waiting and len(self._running) + len(group) < self.config.max_batch_size:
                r = self._waiting[0]
                if r.cancelled or now > r.deadline or r.max_new == 0:
                    self._pop_waiting()
                    reason = "abort" if r.cancelled else "timeout" if now > r.deadline else "length"
                    self._finish(r, reason)
                    continue
                n = r.input_ids.numel()
                if group and n > budget:
                    break
                reuse, past = self._lookup(r)
                p, q = max(pmax, reuse), max(smax, n - reuse)
                peak = kv_peak_tokens(max(width, p + q), [*remaining, *(g.max_new for g in group), r.max_new])
                if (group or self._running) and peak > self.max_batch_tokens:
                    break  # it waits for rows to finish; an empty batch always takes the next request
                r.reuse, r.past = reuse, past
                pmax, smax = p, q
                budget -= n
                group.append(self._pop_waiting())
        except Exception as e:  # requests taken off the queue must not be lost
            for r in group:
                self._finish(r, "error", error=f"admission failed ({type(e).__name__}: {e})")
            raise
        return group

    def _lookup(self, r: Request) -> tuple[int, Layers | None]:
        """The longest cached KV prefix of the request's prompt (in its scope), keeping at least one
        token to run (it gives the next-token logits)."""
        if self.prefix_cache.max_bytes <= 0:
            return 0, None
        reuse, past = self.prefix_cache.lookup(r.content_key, r.cache_scope)
        reuse = min(reuse, r.input_ids.numel() - 1)
        if reuse <= 0:
            return 0, None
        return reuse, [(k[:, :, :reuse], v[:, :, :reuse]) for k, v in past]

    def _step(self, group: list[Request]) -> None:
        self._retire_stale()
        if group:
            self._prefill(group)
        if self._running:
            self._decode()

    def _retire_stale(self) -> None:
        now = time.monotonic()
        stale = [i for i, r in enumerate(self._running) if r.cancelled or now > r.deadline]
        for i in stale:
            r = self._running[i]
            self._finish(r, "abort" if r.cancelled else "timeout")
        if stale:
            self._keep([i for i in range(len(self._running)) if i not in stale])

    def _image_features(self, group: list[Request]) -> list[torch.Tensor | None]:
        """Per request: the features of its images, (n_img * N_tok, D), encoding only cache misses."""
        misses: dict[bytes, torch.Tensor] = {}
        for r in group:
            for k, px in zip(r.image_keys, () if r.pixel_values is None else r.pixel_values, strict=True):
                if k not in misses and self.image_cache.get(k) is None:
                    misses[k] = px
        if misses:
            pixels = torch.stack(list(misses.values())).to(self.runner.device)
            feats = self.model.encode_images(pixels)  # (n, N_tok, D)
            for k, f in zip(misses, feats, strict=True):
                self.image_cache.put(k, f)
            self.counters["images_encoded"] += len(misses)
            fresh = dict(zip(misses, feats, strict=True))
        else:
            fresh = {}
        out: list[torch.Tensor | None] = []
        for r in group:
            fs = [fresh[k] if k in fresh else self.image_cache.get(k) for k in r.image_keys]
            out.append(torch.cat(fs) if fs else None)
            r.pixel_values = None  # no longer needed
        return out

    def _prefill(self, group: list[Request]) -> None:
        feats = self._image_features(group)
        rows = []
        for r, f in zip(group, feats, strict=True):
            n, reuse = r.input_ids.numel(), r.reuse
            if reuse > 0:
                before = int((r.input_ids[:reuse] == self.image_token_id).sum())
                f = None if f is None else f[before:]
            rows.append(PrefillRow(r.input_ids[reuse:], r.past, f))
            r.cached_tokens, r.past = reuse, None
            self.counters["prefill_tokens"] += n - reuse
            self.counters["cached_tokens"] += reuse
        logits, kv = self.runner.prefill(rows)
        self.counters["prefill_steps"] += 1
        tokens = self._sample(logits, group)
        alive = [
            i for i, (r, t) in enumerate(zip(group, tokens, strict=True)) if not self._accept(r, t, kv, i)
        ]
        if not alive:
            return
        if len(alive) < len(group):
            kv.select(alive)
        group = [group[i] for i in alive]
        if self._kv is None:
            self._kv = self.runner.adopt(kv)
        else:
            self._kv.merge(kv)
        self._running.extend(group)
        self.counters["max_running"] = max(self.counters["max_running"], len(self._running))
        self._note_kv()

    def _note_kv(self) -> None:
        """Record the running batch's KV size (rows x columns): the number the budget bounds."""
        size = self._kv.batch_size * self._kv.length
        self.counters["peak_kv_tokens"] = max(self.counters["peak_kv_tokens"], size)

    def _decode(self) -> None:
        lone = bool(self.config.speculative_tokens) and len(self._running) == 1
        if lone:
            r = self._running[0]
            drafts, from_replies = self._drafts(r) if speculable(r) else ([], False)
            pays = bool(drafts) and speculation_pays(r.spec_yield, r.spec_seen, **self.step_seconds)
            probe = bool(drafts) and not pays and self._verify_time_stale(r)
            if pays or probe:
                t0 = time.perf_counter()
                self._verify(r, drafts, from_replies)
                self.step_times["verify"].add(time.perf_counter() - t0)
                self.counters["speculation_probes"] += probe
                self._plain_since_verify = 0
                return
            if drafts:
                shadow_drafts(r, drafts)
            t0 = time.perf_counter()
        tokens = torch.tensor([r.sampled[-1] for r in self._running], dtype=torch.long)
        logits = self.runner.decode(tokens, self._kv)
        self._note_kv()
        for r in self._running:
            r.fed += 1
        self.counters["decode_steps"] += 1
        self.counters["decode_tokens"] += len(self._running)
        sampled = self._sample(logits, self._running)
        keep = [
            i
            for i, (r, t) in enumerate(zip(self._running, sampled, strict=True))
            if not self._accept(r, t, self._kv, i)
        ]
        if len(keep) < len(self._running):
            self._keep(keep)
        if lone:
            self.step_times["plain"].add(time.perf_counter() - t0)
            self._plain_since_verify += 1

    @property
    def step_seconds(self) -> dict[str, float | None]:
        """What a batch-1 plain and verify step cost now (None until one is timed)."""
        return {kind: times.estimate() for kind, times in self.step_times.items()}

    def _verify_time_stale(self, r: Request) -> bool:
        """Whether `r`, refused at the measured cost, should time a verify step anyway: the engine
        has gone SPECULATION_REPROBE_STEPS lone plain steps without one, and r's yield would pay at
        the prior cost. At most one verify step in that many plain steps, and only for requests
        whose drafts land, so a probe costs little where speculation rightly stays off."""
        return self._plain_since_verify >= SPECULATION_REPROBE_STEPS and speculation_pays(
            r.spec_yield, r.spec_seen, None, None
        )

    def _drafts(self, r: Request) -> tuple[list[int], bool]:
        """Drafts for a lone request: n-gram lookup in its own tokens, then in the replies of its
        cache scope (seechat.infer.drafts); never past the reply's end."""
        room = min(self.config.speculative_tokens, r.max_new - len(r.generated) - 1)
        return ngram_drafts(r.history, room, self.image_token_id, self.replies.text(r.cache_scope))

    def _verify(self, r: Request, drafts: list[int], from_replies: bool) -> None:
        """Speculative step for a lone request: run the last token and the drafts in one forward
        (on a bandwidth-bound decode this costs about one token), keep the drafts the model itself
        would have produced, plus the model's own next token: for a greedy request exactly the
        tokens of plain greedy, for a sampled one tokens of exactly plain sampling's distribution
        (`speculative_sample`)."""
        tokens = torch.tensor([[r.sampled[-1], *drafts]], dtype=torch.long)
        logits = self.runner.step(tokens, self._kv)[0]  # (1 + k, V)
        logits[:, self.image_token_id] = float("-inf")
        if plain_greedy(r.params):
            picked = logits.argmax(-1).tolist()
            n = 0
            while n < len(drafts) and drafts[n] == picked[n]:
                n += 1
        else:
            try:
                picked = speculative_sample(next_token_probs(logits, r.params), drafts, r.generator)
            except Exception as e:  # as in _sample: this request fails alone
                log.warning("sampling failed for %s: %s: %s", r.id, type(e).__name__, e)
                self._finish(r, "error", error=f"sampling failed ({type(e).__name__}: {e})")
                self._keep([])
                return
            n = len(picked) - 1
        self._kv.advance(n + 1, len(drafts) + 1)
        self.counters["decode_steps"] += 1
        self.counters["decode_tokens"] += n + 1
        self.counters["draft_tokens"] += len(drafts)
        self.counters["accepted_drafts"] += n
        if from_replies:
            self.counters["history_drafts"] += len(drafts)
            self.counters["accepted_history_drafts"] += n
        note_yield(r, n + 1)
        for token in picked[: n + 1]:
            r.fed += 1
            if self._accept(r, token, self._kv, 0):
                self._keep([])
                return

    def _keep(self, rows: list[int]) -> None:
        self._running = [self._running[i] for i in rows]
        if not rows:
            self._kv = None
        else:
            self._kv.select(rows)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int | None]:
        """One token per row, each with its own sampling parameters. logits (B, V). A row whose
        sampling fails finishes with "error" (its entry is None); the other rows carry on."""
        logits[:, self.image_token_id] = float("-inf")  # the image token is never generated
        out: list[int | None] = logits.argmax(-1).tolist()
        for i, r in enumerate(reqs):
            if plain_greedy(r.params):
                continue
            p = r.params
            try:
                row = logits[i : i + 1]
                if p.repetition_penalty != 1.0:
                    seen = torch.cat([r.input_ids, torch.tensor(r.sampled, dtype=torch.long)]).to(row.device)
                    row = apply_repetition_penalty(row, seen[None], p.repetition_penalty)
                out[i] = int(sample_next(row, p, r.generator)[0])
            except Exception as e:
                log.warning("sampling failed for %s: %s: %s", r.id, type(e).__name__, e)
                self._finish(r, "error", error=f"sampling failed ({type(e).__name__}: {e})")
                out[i] = None
        return out

    # ------------------------------------------------------------------ per-request output

    def _accept(self, r: Request, token: int | None, kv: BatchKV | SlotKV, row: int) -> bool:
        """Record a sampled token, stream new text; True when the request is finished (its KV row
        is then stored in the prefix cache). `token` None: its sampling failed (already finished)."""
        if token is None:
            return True
        r.sampled.append(token)
        r.history += chr(token)
        resolve_shadows(r)
        reason, cut = None, None
        if token in r.stop_ids:
            reason = "stop"
        else:
            r.generated.append(token)
            r.unsent.append(token)
            seen = len(r.text)
            r.detokenize(self.processor.decode)
            cut = r.stops.feed(r.text[seen:])
        text = r.text
        if reason is None and cut is not None:
            reason, text = "stop", text[:cut]
        if reason is None and len(r.generated) >= r.max_new:
            reason = "length"
        if reason is None:
            safe = len(text) - r.stops.held
            if safe > len(r.sent):
                delta = text[len(r.sent) : safe]
                r.sent += delta
                ids, r.unsent = tuple(r.unsent), []
                r.sink(StreamEvent(delta, ids))
            return False
        self.replies.add(r.cache_scope, r.sampled)
        if r.cache_prefix and self.prefix_cache.max_bytes > 0:
            key = torch.cat([r.content_key, torch.tensor(r.sampled[: r.fed], dtype=torch.long)])
            layers = [(k[:, :, : len(key)], v[:, :, : len(key)]) for k, v in kv.row(row)]
            self.prefix_cache.store(key, layers, r.cache_scope)
        if cut is None:  # the exact text, trailing partial characters included
            text = self.processor.decode(r.generated)
        delta = text[len(r.sent) :] if text.startswith(r.sent) else ""
        r.sent += delta
        self._finish(r, reason, delta, tuple(r.unsent))
        return True

    def _finish(
        self, r: Request, reason: str, text: str = "", ids: tuple[int, ...] = (), error: str | None = None
    ) -> None:
        if r.done:
            return
        r.done = True
        r.pixel_values = r.past = None
        if reason == "abort":
            self.counters["aborted"] += 1
        elif reason == "error":
            self.counters["failed"] += 1
        try:
            r.sink(
                StreamEvent(text, ids, reason, error, r.input_ids.numel(), len(r.generated), r.cached_tokens)
            )
        except Exception:
            log.exception("a request's sink failed")
