"""One request's state and output: token bookkeeping, incremental detokenisation, stop strings,
n-gram drafts for speculative decoding, and the events a consumer receives.

Plain data and string functions; the scheduler that drives them is `seechat.infer.engine`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from seechat.infer.generate import SamplingParams


@dataclass(frozen=True)
class StreamEvent:
    """A piece of a reply. The last event of a request has `finish_reason` set:
    "stop" (stop token or stop string), "length" (max_new_tokens or context), "abort"
    (cancelled), "timeout", or "error" (with `error`)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(eq=False)
class Request:
    id: str
    input_ids: torch.Tensor  # (T,) long
    images: list[Image.Image]
    image_keys: list[bytes]
    content_key: torch.Tensor  # (T,) ids with image tokens replaced by image tags
    params: SamplingParams
    stop: tuple[str, ...]
    stop_ids: frozenset[int]
    max_new: int
    sink: Callable[[StreamEvent], None]
    deadline: float
    cache_prefix: bool
    generator: torch.Generator | None
    sampled: list[int] = field(default_factory=list)  # every sampled token, stop token included
    generated: list[int] = field(default_factory=list)  # the reply's tokens (no stop token)
    fed: int = 0  # sampled tokens whose KV is in the batch
    sent: str = ""  # text already streamed
    unsent: list[int] = field(default_factory=list)  # reply tokens not yet reported in an event
    text: str = ""  # the reply decoded so far (incrementally; complete characters only)
    offsets: tuple[int, int] = (0, 0)  # incremental detokenisation window into `generated`
    history: str = ""  # prompt + sampled token ids as one character each: C-speed n-gram search

    def detokenize(self, decode: Callable[[list[int]], str]) -> None:
        """Extend `text` by the newest reply token: decode a short window rather than the whole
        reply (a token's text can depend on its neighbours, and a character can span tokens)."""
        start, read = self.offsets
        before = decode(self.generated[start:read])
        after = decode(self.generated[start:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.offsets = (read, len(self.generated))
    cached_tokens: int = 0
    cancelled: bool = False
    done: bool = False


def plain_greedy(p: SamplingParams) -> bool:
    return p.temperature <= 0 and p.repetition_penalty == 1.0


def ngram_drafts(r: Request, k: int, image_token_id: int, sizes: tuple[int, ...] = (3, 2)) -> list[int]:
    """Prompt-lookup drafts: the tokens that followed the latest earlier occurrence of the last n
    tokens (prompt and reply), for the longest n that occurs; none when nothing repeats. Drafts
    stop before an image token, which is never generated."""
    h = r.history
    room = r.max_new - len(r.generated) - 1  # never draft past the reply's end
    if room <= 0:
        return []
    for n in sizes:
        if len(h) <= n:
            continue
        at = h.rfind(h[-n:], 0, len(h) - 1)
        if at >= 0:
            drafts = [ord(c) for c in h[at + n : at + n + min(k, room)]]
            return drafts[: drafts.index(image_token_id)] if image_token_id in drafts else drafts
    return []


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could be the start of a stop string (not streamed yet)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
