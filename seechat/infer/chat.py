"""Multi-turn chat about images, over either backend: the serving engine or the model itself.

`ChatSession(backend, processor, system=None)` owns one conversation (messages and images). Every
turn renders the whole history with the chat template (`prompt_ids`) and decodes the reply with the
backend, streaming text pieces:

- an `Engine` (`seechat.infer.engine`): the turn costs the new message only, since the engine finds
  the old turns' KV in its prefix cache and their image features in its image cache; batching,
  stop strings and cancellation are the engine's;
- a `SeeChatModel`: `seechat.infer.generate.stream_generate` in the calling thread, no scheduler
  (scripts, tests, the demo); stop strings are matched here with the engine's `StopStrings`.

Both give the same greedy reply. What this module is not: the engine, or the HTTP API's message
handling (`seechat.serve`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from seechat.data.processor import SeeChatProcessor
from seechat.infer.engine import Engine
from seechat.infer.generate import stream_generate
from seechat.infer.request import StopStrings, StreamEvent
from seechat.infer.sampling import SamplingParams
from seechat.model.modeling import SeeChatModel


def prompt_ids(
    processor: SeeChatProcessor, messages: Sequence[dict[str, str]], n_images: int
) -> torch.Tensor:
    """`processor.encode_prompt(...).input_ids` without preprocessing images (the engine encodes
    only images it has not seen); see `SeeChatProcessor.prompt_ids`. (T,)"""
    return processor.prompt_ids(messages, n_images)


def model_events(
    model: SeeChatModel,
    processor: SeeChatProcessor,
    ids: torch.Tensor,
    images: Sequence[Image.Image],
    params: SamplingParams,
    stop: Sequence[str] = (),
) -> Iterator[StreamEvent]:
    """The engine's event stream for one prompt (T,), decoded by the model in this thread: text
    pieces, then a last event with `finish_reason` "stop" (stop token or string) or "length".
    Images are preprocessed now, so a bad image raises before any decoding."""
    pixel_values = processor.preprocess_images(list(images))
    stop_ids = processor.stop_token_ids
    tokens = stream_generate(model, ids[None], None, pixel_values, params, stop_ids)

    def events() -> Iterator[StreamEvent]:
        stops, generated, text, sent = StopStrings(stop), [], "", 0
        reason, cut = "length", False
        for step in tokens:
            token = int(step[0])
            if token in stop_ids:
                reason = "stop"
                break
            generated.append(token)
            decoded = processor.decode(generated)
            if decoded.endswith("\ufffd"):  # wait for a whole character before showing it
                continue
            hit = stops.feed(decoded[len(text) :])
            text = decoded
            if hit is not None:
                text, reason, cut = text[:hit], "stop", True
                break
            ready = len(text) - stops.held  # what could start a stop string is held back
            if ready > sent:
                yield StreamEvent(text=text[sent:ready], completion_tokens=len(generated))
                sent = ready
        if not cut:
            text = processor.decode(generated)
        yield StreamEvent(
            text=text[sent:],
            finish_reason=reason,
            prompt_tokens=int(ids.shape[0]),
            completion_tokens=len(generated),
        )

    return events()


@dataclass
class ChatSession:
    """One conversation over `backend` (an `Engine` or a `SeeChatModel`)."""

    backend: Engine | SeeChatModel
    processor: SeeChatProcessor
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    last: StreamEvent | None = None  # the final event of the last turn (usage, finish reason)

    def stream(
        self,
        question: str,
        images: Sequence[Image.Image] = (),
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
    ) -> Iterator[str]:
        """Yield the reply in pieces as it is generated; the history records the whole reply (a
        reply stopped by closing the stream stays in the history as far as it got)."""
        marker = self.processor.image_token
        content = "".join(f"{marker}\n" for _ in images) + question if marker not in question else question
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        history = [*history, {"role": "user", "content": content}]
        all_images = [*self.images, *images]
        ids = prompt_ids(self.processor, history, len(all_images))
        if isinstance(self.backend, Engine):
            events = self.backend.stream(ids, all_images, params, stop)
        else:
            events = model_events(self.backend, self.processor, ids, all_images, params, stop)
        # submitted: an error before this line leaves the history as it was
        self.messages.append(history[-1])
        self.images = all_images
        yield from self._reply(events)

    def _reply(self, events: Iterator[StreamEvent]) -> Iterator[str]:
        parts: list[str] = []
        try:
            for ev in events:
                if ev.text:
                    parts.append(ev.text)
                    yield ev.text
                if ev.finish_reason is not None:
                    self.last = ev
                    if ev.finish_reason == "error":
                        raise RuntimeError(f"generation failed: {ev.error}")
        finally:
            self.messages.append({"role": "assistant", "content": "".join(parts)})

    def ask(
        self,
        question: str,
        images: Sequence[Image.Image] = (),
        params: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
    ) -> str:
        return "".join(self.stream(question, images, params, stop))

    def clear(self) -> None:
        self.messages.clear()
        self.images.clear()
        self.last = None
