"""A small chat helper: answer about one or more images, keeping multi-turn history.

`ChatSession` owns the message history and the images of one conversation; each `ask` renders the
whole history with the chat template and generates with a KV cache. The serving engine (with
image-feature and prefix caching, batching) is `seechat.infer.engine`; this helper is the
straightforward path for scripts and tests.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image

from seechat.data.collate import collate
from seechat.data.processor import SeeChatProcessor
from seechat.infer.generate import stream_generate
from seechat.infer.sampling import SamplingParams
from seechat.model.modeling import SeeChatModel


@dataclass
class ChatSession:
    model: SeeChatModel
    processor: SeeChatProcessor
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)

    def _prepare(self, question: str, images: Sequence[Image.Image]) -> dict:
        marker = self.processor.image_token
        content = "".join(f"{marker}\n" for _ in images) + question if marker not in question else question
        self.images.extend(images)
        self.messages.append({"role": "user", "content": content})
        history = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        enc = self.processor.encode_prompt(history, self.images)
        return collate([enc], self.processor.tokenizer.pad_token_id, side="left")

    def stream(
        self, question: str, images: Sequence[Image.Image] = (), params: SamplingParams = SamplingParams()
    ) -> Iterator[str]:
        """Yield the reply as text pieces while it is generated; the history records the whole reply."""
        batch = self._prepare(question, images)
        stops = self.processor.stop_token_ids
        ids: list[int] = []
        printed = ""
        for tok in stream_generate(
            self.model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], params, stops
        ):
            t = int(tok[0])
            if t in stops:
                break
            ids.append(t)
            text = self.processor.decode(ids)
            if not text.endswith("\ufffd"):  # wait for a whole character before showing it
                yield text[len(printed) :]
                printed = text
        reply = self.processor.decode(ids)
        if reply != printed:
            yield reply[len(printed) :]
        self.messages.append({"role": "assistant", "content": reply})

    def ask(
        self, question: str, images: Sequence[Image.Image] = (), params: SamplingParams = SamplingParams()
    ) -> str:
        return "".join(self.stream(question, images, params))

    def clear(self) -> None:
        self.messages.clear()
        self.images.clear()
