"""The serving engine: continuous batching over a KV cache, with image-feature and prefix caches.

One scheduler thread owns the model. Each iteration it

1. admits waiting requests (up to `max_batch_size` running, `max_prefill_tokens` per step),
   encodes the images no earlier request has shown (features cached by pixel content), looks up
   the longest cached KV prefix of each prompt, prefills only what is new — all admitted requests
   in one left-padded forward — and joins them to the running batch;
2. decodes one token for every running request in one batched forward;
3. samples each row with its own parameters, streams text deltas to each request's sink, and
   retires finished rows (their KV goes to the prefix cache, so the next turn of that chat
   prefills only the new message).

Requests come in as token ids (image tokens already expanded) plus PIL images and sampling
parameters; they go out as `StreamEvent`s. The engine knows token ids, images and text pieces, not
chat roles or HTTP: `seechat.infer.session` renders conversations, `seechat.serve` speaks OpenAI.
Submitting is thread-safe; `stream` (sync) and `astream` (asyncio) wrap `submit`.

Greedy outputs do not depend on what else is in the batch: rows are independent (attention masks
and per-row position ids), which the tests check against single-request runs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from seechat.data.processor import SeeChatProcessor
from seechat.infer.generate import SamplingParams, apply_repetition_penalty, sample_next
from seechat.infer.images import ImageFeatureCache, image_key, key_tag
from seechat.infer.kv import BatchKV, PrefixCache
from seechat.infer.request import (
    Completion,
    Request,
    StreamEvent,
    find_stop,
    held_back,
    ngram_drafts,
    plain_greedy,
)
from seechat.infer.runner import ModelRunner, PrefillRow
from seechat.model.seechat import SeeChatModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # requests decoded together
    max_waiting: int = 256  # admitted but not yet running; beyond this, submit raises QueueFullError
    max_prefill_tokens: int = 4096  # new tokens prefilled per step (at least one request always)
    max_model_len: int = 0  # prompt + reply tokens; 0 = the language model's own limit
    max_images_per_request: int = 16
    image_cache_entries: int = 256
    prefix_cache_mb: int = 256  # 0 = no prefix reuse
    request_timeout_s: float = 600.0  # from submit to the last token
    fast_decode: str = "auto"  # "auto" | "on" | "off": the fast decode step (see seechat.infer.runner)
    speculative_tokens: int = 4  # n-gram draft tokens verified per step for a lone greedy request; 0 = off


class RequestError(ValueError):
    """The request cannot be served as given (too long, image count mismatch ...)."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


class EngineClosedError(RuntimeError):
    """The engine is shut down or shutting down."""


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
    def __init__(self, model: SeeChatModel, processor: SeeChatProcessor, config: EngineConfig = EngineConfig()):
        self.model = model.eval()
        self.processor = processor
        self.config = config
        self.runner = ModelRunner(model, processor.tokenizer.pad_token_id, config.fast_decode)
        self.max_model_len = config.max_model_len or self.runner.max_positions()
        self.stop_token_ids = list(processor.stop_token_ids)
        self.image_token_id = model.image_token_id
        self.image_cache = ImageFeatureCache(config.image_cache_entries)
        self.prefix_cache = PrefixCache(config.prefix_cache_mb << 20)
        self.counters = dict.fromkeys(
            ("requests", "prefill_steps", "prefill_tokens", "cached_tokens", "decode_steps", "decode_tokens",
             "images_encoded", "max_running", "aborted", "draft_tokens", "accepted_drafts"), 0,
        )
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._kv: BatchKV | None = None
        self._ids = itertools.count()
        self._closing = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="seechat-engine", daemon=True)
            self._thread.start()
        return self

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
            running, waiting = len(self._running), len(self._waiting)
        return {
            **self.counters, "running": running, "waiting": waiting,
            "image_cache_hits": self.image_cache.hits, "image_cache_entries": len(self.image_cache),
            "prefix_cache_entries": len(self.prefix_cache), "prefix_cache_bytes": self.prefix_cache.bytes,
        }

    # ------------------------------------------------------------------ submitting

    def submit(
        self,
        input_ids: torch.Tensor | Sequence[int],
        images: Sequence[Image.Image] = (),
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        sink: Callable[[StreamEvent], None] | None = None,
        cache_prefix: bool = True,
        ignore_eos: bool = False,
    ) -> RequestHandle:
        """Queue a request; `sink` receives its events on the engine thread (keep it quick).
        `cache_prefix`: keep its KV for later requests that share the prefix (chat turns).
        `ignore_eos`: generate exactly max_new_tokens (benchmarks); stop strings still apply."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).flatten().cpu()
        n_tok = self.model.num_image_tokens
        if ids.numel() == 0:
            raise RequestError("the prompt is empty")
        if len(images) > self.config.max_images_per_request:
            raise RequestError(
                f"{len(images)} images in one request; this server accepts at most "
                f"{self.config.max_images_per_request}"
            )
        is_image = ids == self.image_token_id
        if int(is_image.sum()) != len(images) * n_tok:
            raise RequestError(
                f"the prompt has {int(is_image.sum())} image tokens but {len(images)} image(s) x {n_tok} tokens "
                "were expected; expand each <image> marker with the processor"
            )
        if ids.numel() >= self.max_model_len:
            raise RequestError(
                f"the prompt is {ids.numel()} tokens ({len(images)} image(s) x {n_tok} tokens included); the "
                f"model's context is {self.max_model_len} tokens, which leaves no room for a reply"
            )
        keys = [image_key(im) for im in images]
        content = ids.clone()
        if keys:
            tags = torch.tensor([key_tag(k) for k in keys], dtype=torch.long).repeat_interleave(n_tok)
            content[is_image] = tags
        now = time.monotonic()
        req = Request(
            id=f"req-{next(self._ids)}",
            input_ids=ids,
            images=list(images),
            image_keys=keys,
            content_key=content,
            params=params,
            stop=tuple(s for s in stop if s),
            stop_ids=frozenset() if ignore_eos else frozenset(self.stop_token_ids),
            max_new=max(0, min(params.max_new_tokens, self.max_model_len - ids.numel())),
            sink=sink or (lambda ev: None),
            deadline=now + self.config.request_timeout_s,
            cache_prefix=cache_prefix,
            generator=None if params.seed is None else torch.Generator().manual_seed(params.seed),
            history="".join(map(chr, ids.tolist())),
        )
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is shutting down")
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting (max_waiting={self.config.max_waiting}); "
                    "retry later"
                )
            self._waiting.append(req)
            self.counters["requests"] += 1
            if self._thread is None:
                self.start()
            self._cond.notify_all()
        return RequestHandle(self, req)

    def stream(self, input_ids, images=(), params=SamplingParams(), stop=(), cache_prefix=True, ignore_eos=False) -> Iterator[StreamEvent]:
        """Submit now (errors raise here) and return the request's events as they come (blocking).
        Closing the iterator early cancels the request."""
        q: queue.Queue[StreamEvent] = queue.Queue()
        handle = self.submit(input_ids, images, params, stop, q.put, cache_prefix, ignore_eos)

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
        self, input_ids, images=(), params=SamplingParams(), stop=(), cache_prefix=True,
        loop: asyncio.AbstractEventLoop | None = None, ignore_eos: bool = False,
    ) -> AsyncEvents:
        """Submit now (errors such as QueueFullError raise here) and return an async iterator of the
        request's events, delivered through `loop` (default: the running loop). Call its `cancel()`
        when the consumer goes away (a client disconnect) to free the batch slot."""
        loop = loop or asyncio.get_running_loop()
        q: asyncio.Queue[StreamEvent] = asyncio.Queue()
        handle = self.submit(
            input_ids, images, params, stop, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev), cache_prefix, ignore_eos
        )
        return AsyncEvents(handle, q)

    def generate(self, input_ids, images=(), params=SamplingParams(), stop=(), cache_prefix=True, ignore_eos=False) -> Completion:
        """The whole reply of one request (blocking)."""
        parts, ids, last = [], [], StreamEvent()
        for ev in self.stream(input_ids, images, params, stop, cache_prefix, ignore_eos):
            parts.append(ev.text)
            ids.extend(ev.token_ids)
            last = ev
        if last.finish_reason == "error":
            raise RuntimeError(last.error)
        return Completion("".join(parts), ids, last.finish_reason, last.prompt_tokens, last.completion_tokens, last.cached_tokens)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ the scheduler

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._closing and not self._waiting and not self._running:
                    self._cond.wait()
                if self._closing:
                    doomed = list(self._waiting) + self._running
                    self._waiting.clear()
                    break
                group = self._admit()
            try:
                with torch.inference_mode():
                    self._step(group)
            except Exception as e:  # never let one bad batch take the server down
                log.exception("engine step failed")
                for r in group + self._running:
                    self._finish(r, "error", error=f"{type(e).__name__}: {e}")
                self._running, self._kv = [], None
        for r in doomed:
            self._finish(r, "abort", error="the engine shut down")
        self._running, self._kv = [], None

    def _admit(self) -> list[Request]:
        """Under the lock: waiting requests that join this step (cancelled or late ones finish)."""
        group: list[Request] = []
        budget = self.config.max_prefill_tokens
        now = time.monotonic()
        while self._waiting and len(self._running) + len(group) < self.config.max_batch_size:
            r = self._waiting[0]
            if r.cancelled or now > r.deadline or r.max_new == 0:
                self._waiting.popleft()
                reason = "abort" if r.cancelled else "timeout" if now > r.deadline else "length"
                self._finish(r, reason)
                continue
            if group and r.input_ids.numel() > budget:
                break
            budget -= r.input_ids.numel()
            group.append(self._waiting.popleft())
        return group

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
        misses: dict[bytes, Image.Image] = {}
        for r in group:
            for k, im in zip(r.image_keys, r.images, strict=True):
                if k not in misses and self.image_cache.get(k) is None:
                    misses[k] = im
        if misses:
            pixels = self.processor.preprocess_images(list(misses.values())).to(self.runner.device)
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
            r.images = []  # pixels are no longer needed
        return out

    def _prefill(self, group: list[Request]) -> None:
        feats = self._image_features(group)
        rows = []
        for r, f in zip(group, feats, strict=True):
            n = r.input_ids.numel()
            reuse, past = (0, None)
            if self.prefix_cache.max_bytes > 0:
                reuse, past = self.prefix_cache.lookup(r.content_key)
            reuse = min(reuse, n - 1)  # at least one token runs, to give the next-token logits
            if reuse > 0:
                past = [(k[:, :, :reuse], v[:, :, :reuse]) for k, v in past]
                before = int((r.input_ids[:reuse] == self.image_token_id).sum())
                f = None if f is None else f[before:]
            else:
                past = None
            r.cached_tokens = reuse
            rows.append(PrefillRow(r.input_ids[reuse:], past, f))
            self.counters["prefill_tokens"] += n - reuse
            self.counters["cached_tokens"] += reuse
        logits, kv = self.runner.prefill(rows)
        self.counters["prefill_steps"] += 1
        tokens = self._sample(logits, group)
        alive = [i for i, (r, t) in enumerate(zip(group, tokens, strict=True)) if not self._accept(r, t, kv, i)]
        if not alive:
            return
        if len(alive) < len(group):
            kv.select(alive)
        group = [group[i] for i in alive]
        if self._kv is None:
            self._kv = kv
        else:
            self._kv.merge(kv)
        self._running.extend(group)
        self.counters["max_running"] = max(self.counters["max_running"], len(self._running))

    def _decode(self) -> None:
        if self.config.speculative_tokens and len(self._running) == 1:
            r = self._running[0]
            drafts = ngram_drafts(r, self.config.speculative_tokens, self.image_token_id) if plain_greedy(r.params) else []
            if drafts:
                self._verify(r, drafts)
                return
        tokens = torch.tensor([r.sampled[-1] for r in self._running], dtype=torch.long)
        logits = self.runner.decode(tokens, self._kv)
        for r in self._running:
            r.fed += 1
        self.counters["decode_steps"] += 1
        self.counters["decode_tokens"] += len(self._running)
        sampled = self._sample(logits, self._running)
        keep = [i for i, (r, t) in enumerate(zip(self._running, sampled, strict=True)) if not self._accept(r, t, self._kv, i)]
        if len(keep) < len(self._running):
            self._keep(keep)

    def _verify(self, r: Request, drafts: list[int]) -> None:
        """Speculative step for a lone greedy request: run the last token and the drafts in one
        forward (on a bandwidth-bound decode this costs about one token), keep the drafts the model
        itself would have produced, plus the model's own next token. Same tokens as plain greedy."""
        tokens = torch.tensor([[r.sampled[-1], *drafts]], dtype=torch.long)
        logits = self.runner.step(tokens, self._kv)[0]  # (1 + k, V)
        logits[:, self.image_token_id] = float("-inf")
        greedy = logits.argmax(-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == greedy[n]:
            n += 1
        self._kv.advance(n + 1, len(drafts) + 1)
        self.counters["decode_steps"] += 1
        self.counters["decode_tokens"] += n + 1
        self.counters["draft_tokens"] += len(drafts)
        self.counters["accepted_drafts"] += n
        for token in greedy[: n + 1]:
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

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """One token per row, each with its own sampling parameters. logits (B, V)."""
        logits[:, self.image_token_id] = float("-inf")  # the image token is never generated
        out = logits.argmax(-1).tolist()
        for i, r in enumerate(reqs):
            p = r.params
            if p.temperature <= 0 and p.repetition_penalty == 1.0:
                continue
            row = logits[i : i + 1]
            if p.repetition_penalty != 1.0:
                seen = torch.cat([r.input_ids, torch.tensor(r.sampled, dtype=torch.long)]).to(row.device)
                row = apply_repetition_penalty(row, seen[None], p.repetition_penalty)
            out[i] = int(sample_next(row, p, r.generator)[0])
        return out

    # ------------------------------------------------------------------ per-request output

    def _accept(self, r: Request, token: int, kv: BatchKV, row: int) -> bool:
        """Record a sampled token, stream new text; True when the request is finished (its KV row
        is then stored in the prefix cache)."""
        r.sampled.append(token)
        r.history += chr(token)
        reason = None
        if token in r.stop_ids:
            reason = "stop"
        else:
            r.generated.append(token)
            r.unsent.append(token)
            r.detokenize(self.processor.decode)
        text = r.text
        cut = find_stop(text, r.stop)
        if reason is None and cut is not None:
            reason, text = "stop", text[:cut]
        if reason is None and len(r.generated) >= r.max_new:
            reason = "length"
        if reason is None:
            safe = len(text) - held_back(text, r.stop)
            if safe > len(r.sent):
                delta = text[len(r.sent) : safe]
                r.sent += delta
                ids, r.unsent = tuple(r.unsent), []
                r.sink(StreamEvent(delta, ids))
            return False
        if r.cache_prefix and self.prefix_cache.max_bytes > 0:
            key = torch.cat([r.content_key, torch.tensor(r.sampled[: r.fed], dtype=torch.long)])
            self.prefix_cache.store(key, [(k[:, :, : len(key)], v[:, :, : len(key)]) for k, v in kv.row(row)])
        if cut is None:  # the exact text, trailing partial characters included
            text = self.processor.decode(r.generated)
        delta = text[len(r.sent) :] if text.startswith(r.sent) else ""
        r.sent += delta
        self._finish(r, reason, delta, tuple(r.unsent))
        return True

    def _finish(self, r: Request, reason: str, text: str = "", ids: tuple[int, ...] = (), error: str | None = None) -> None:
        if r.done:
            return
        r.done = True
        if reason == "abort":
            self.counters["aborted"] += 1
        try:
            r.sink(StreamEvent(text, ids, reason, error, r.input_ids.numel(), len(r.generated), r.cached_tokens))
        except Exception:
            log.exception("a request's sink failed")
