"""Multi-turn chat over the serving engine: history, images, streaming.

`EngineChat` keeps one conversation (messages + images) and sends the whole rendered history to
the engine every turn. Nothing is recomputed for the old turns: the engine finds their KV in its
prefix cache (keyed by content) and their image features in its image cache, so a turn costs the
new message only. `prompt_ids` renders a conversation to token ids without touching pixels.

For scripts that do not want a scheduler thread, `seechat.infer.chat.ChatSession` is the plain
path over `generate.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from seechat.data.processor import SeeChatProcessor
from seechat.infer.engine import Engine, StreamEvent
from seechat.infer.sampling import SamplingParams


def prompt_ids(
    processor: SeeChatProcessor, messages: Sequence[dict[str, str]], n_images: int
) -> torch.Tensor:
    """`processor.encode_prompt(...).input_ids` without preprocessing images (the engine encodes
    only images it has not seen); see `SeeChatProcessor.prompt_ids`."""
    return processor.prompt_ids(messages, n_images)


@dataclass
class EngineChat:
    engine: Engine
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
        """Yield the reply in pieces as it is generated; the history records the whole reply."""
        marker = self.processor.image_token
        content = "".join(f"{marker}\n" for _ in images) + question if marker not in question else question
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        history = [*history, {"role": "user", "content": content}]
        all_images = [*self.images, *images]
        ids = prompt_ids(self.processor, history, len(all_images))
        events = self.engine.stream(
            ids, all_images, params, stop
        )  # submits now: errors leave history as it was
        self.messages.append(history[-1])
        self.images = all_images
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
        finally:  # a stopped reply (the caller closed the stream) stays in the history as far as it got
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
