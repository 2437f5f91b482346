"""One request's state and output: token bookkeeping, incremental detokenisation, stop strings
(matched in time linear in the reply), the bookkeeping of speculative decoding's yield, and the
events a consumer receives (the drafts themselves: seechat.infer.drafts).

Plain data and string functions; the scheduler that drives them is `seechat.infer.engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from seechat.infer.kv import Layers
from seechat.infer.sampling import GREEDY_BELOW, SamplingParams


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


class StopStrings:
    """Stop strings found in a growing text in time linear in the text: one Knuth-Morris-Pratt
    automaton per stop string advances over each new character, so a decoded token costs O(new
    characters x stop strings) whatever the reply's length or the stop strings' lengths (the naive
    re-scan of the whole text plus a hold-back check over every prefix was quadratic)."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # per stop: characters of it matched at the text's end
        self._fed = 0

    def feed(self, text: str) -> int | None:
        """Append `text`; -> where (in everything fed) the earliest complete stop string starts, or
        None. Only stop strings completed by this text can be new: earlier ones would have stopped."""
        best = None
        for j, s in enumerate(self.stops):
            fail, k, n = self._fail[j], self._state[j], len(s)
            for i, c in enumerate(text):
                while k and s[k] != c:
                    k = fail[k - 1]
                if s[k] == c:
                    k += 1
                if k == n:
                    start = self._fed + i + 1 - n
                    best = start if best is None else min(best, start)
                    k = fail[k - 1]
            self._state[j] = k
        self._fed += len(text)
        return best

    @property
    def held(self) -> int:
        """How many trailing characters could be the start of a stop string (not streamed yet)."""
        return max(self._state, default=0)


def _failure(s: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper border of s[: i + 1]."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


@dataclass(eq=False)
class Request:
    id: str
    input_ids: torch.Tensor  # (T,) long
    pixel_values: (
        torch.Tensor | None
    )  # (n_img, 3, H, W), preprocessed on the submitting thread; None after prefill
    image_keys: list[bytes]
    content_key: torch.Tensor  # (T,) ids with image tokens replaced by image tags
    params: SamplingParams
    stops: StopStrings
    stop_ids: frozenset[int]
    max_new: int
    sink: Callable[[StreamEvent], None]
    deadline: float
    cache_prefix: bool
    cache_scope: str  # prefix reuse happens only between requests of one scope (an API key)
    generator: torch.Generator | None
    nbytes: int = 0  # what it holds while waiting (pixels, ids), counted against the queue's byte budget
    reuse: int = 0  # prompt tokens whose KV comes from the prefix cache (found at admission)
    past: Layers | None = None  # that KV, per layer (1, H, reuse, D)
    sampled: list[int] = field(default_factory=list)  # every sampled token, stop token included
    generated: list[int] = field(default_factory=list)  # the reply's tokens (no stop token)
    fed: int = 0  # sampled tokens whose KV is in the batch
    sent: str = ""  # text already streamed
    unsent: list[int] = field(default_factory=list)  # reply tokens not yet reported in an event
    text: str = ""  # the reply decoded so far (incrementally; complete characters only)
    offsets: tuple[int, int] = (0, 0)  # incremental detokenisation window into `generated`
    history: str = ""  # prompt + sampled token ids as one character each: C-speed n-gram search
    spec_yield: float = 0.0  # moving average of tokens a verify step gives this request (1 + accepted drafts)
    spec_seen: int = 0  # verify steps and shadow drafts behind spec_yield
    shadow: list[list] = field(
        default_factory=list
    )  # drafts not verified: [start in sampled, drafts, matched]
    cached_tokens: int = 0
    cancelled: bool = False
    done: bool = False

    def detokenize(self, decode: Callable[[list[int]], str]) -> None:
        """Extend `text` by the newest reply token: decode a short window rather than the whole
        reply (a token's text can depend on its neighbours, and a character can span tokens)."""
        start, read = self.offsets
        before = decode(self.generated[start:read])
        after = decode(self.generated[start:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.offsets = (read, len(self.generated))


YIELD_AVERAGE = 0.3  # weight of the newest observation in Request.spec_yield


def note_yield(r: Request, tokens: int) -> None:
    """One verify step (real or shadow) would have given `tokens` tokens (1 + accepted drafts)."""
    r.spec_yield = tokens if r.spec_seen == 0 else r.spec_yield + YIELD_AVERAGE * (tokens - r.spec_yield)
    r.spec_seen += 1


def shadow_drafts(r: Request, drafts: list[int]) -> None:
    """Drafts proposed but not verified (a plain step runs instead): greedy decoding is deterministic,
    so the tokens the plain steps produce next say exactly how many of them a verify step would have
    accepted — acceptance is measured at no model cost while speculation is off."""
    r.shadow.append([len(r.sampled), drafts, 0])


def resolve_shadows(r: Request) -> None:
    """After a token is appended to `r.sampled`: advance the pending shadow drafts; a draft that
    misses or is used up records its yield."""
    if not r.shadow:
        return
    token, pending = r.sampled[-1], []
    for entry in r.shadow:
        _, drafts, matched = entry
        if drafts[matched] == token:
            entry[2] = matched = matched + 1
            if matched < len(drafts):
                pending.append(entry)
                continue
        note_yield(r, 1 + matched)
    r.shadow = pending


def plain_greedy(p: SamplingParams) -> bool:
    return p.temperature < GREEDY_BELOW and p.repetition_penalty == 1.0


def speculable(r: Request) -> bool:
    """Whether a lone request may decode speculatively: greedy (the drafts kept are exactly the
    greedy tokens), or sampling without a seed (speculative sampling draws from exactly the same
    distribution, but not the same random numbers: a seeded reply would then depend on when
    speculation ran) and without a repetition penalty (which changes with every token)."""
    p = r.params
    return p.repetition_penalty == 1.0 and (p.temperature < GREEDY_BELOW or r.generator is None)
