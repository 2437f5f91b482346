"""Draft tokens for speculative decoding: n-gram lookup in the request itself (prompt lookup) and
in the replies the engine gave before (a bounded history per cache scope).

A draft only proposes; the verify step keeps exactly the tokens plain greedy decoding would have
produced, so where drafts come from changes speed, never output. Token sequences are kept as
strings, one character per token id, so the lookup is `str.rfind`: a C-speed search (tens of
microseconds over the whole history).

Why a history of replies: a serving model's replies repeat across requests far more than a reply
repeats its own prompt (answers to the same kind of question share their phrasing, a caption model
its sentence patterns); the measured gain is in docs/serving.md, "Speculative decoding". This is
the idea of SuffixDecoding (Oliaro et al., 2024) and of vLLM's suffix proposer, done with the
engine's existing n-gram search.

The history is kept per cache scope (the server passes one per API key), as the prefix cache is:
how fast a reply streams can hint at what other requests of the same scope were answered, so
requests of different scopes never draft from each other's replies.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

NGRAM_SIZES = (4, 3, 2)  # longest first: the longest n-gram that occurs drafts
SEPARATOR = chr(0x10FFFF)  # between replies in the history; no token id reaches it


def token_text(tokens: Sequence[int]) -> str:
    """Token ids as a string, one character each (the form every lookup here searches)."""
    return "".join(map(chr, tokens))


def _continuation(text: str, at: int, k: int) -> list[int]:
    """Up to k tokens of `text` from position `at`, stopping at a reply separator."""
    piece = text[at : at + k]
    cut = piece.find(SEPARATOR)
    return [ord(c) for c in (piece if cut < 0 else piece[:cut])]


def ngram_drafts(
    history: str,
    k: int,
    image_token_id: int,
    replies: str = "",
    sizes: Sequence[int] = NGRAM_SIZES,
) -> tuple[list[int], bool]:
    """Up to k drafts: the tokens that followed the latest earlier occurrence of the last n tokens of
    `history` (the request's prompt and reply so far), searched in `history` itself and then in
    `replies` (earlier replies, `ReplyHistory.text`), for the longest n that occurs in either; none
    when nothing repeats. Drafts stop before an image token, which is never generated.
    -> (drafts, whether they came from `replies`)."""
    if k <= 0:
        return [], False
    for n in sizes:
        if len(history) <= n:
            continue
        key = history[-n:]
        at = history.rfind(key, 0, len(history) - 1)
        from_replies = at < 0
        if from_replies:
            at = replies.rfind(key, 0, len(replies) - 1) if replies else -1
            if at < 0:
                continue
        drafts = _continuation(replies if from_replies else history, at + n, k)
        if image_token_id in drafts:
            drafts = drafts[: drafts.index(image_token_id)]
        if drafts:
            return drafts, from_replies
    return [], False


class ReplyHistory:
    """The latest replies the engine gave, per cache scope: at most `max_tokens` tokens a scope
    (the oldest replies are dropped first) and `max_scopes` scopes (the least recently used is
    dropped), so memory stays bounded: each reply and the joined text a lookup searches hold about
    8.5 bytes a token (36 MB at 65,536 tokens x 64 scopes, measured). Adding a reply is O(its length);
    the joined text a lookup searches is rebuilt only when the scope changed since the last one.
    `max_tokens` 0 keeps nothing."""

    def __init__(self, max_tokens: int, max_scopes: int = 64):
        self.max_tokens = max_tokens
        self.max_scopes = max_scopes
        self._scopes: OrderedDict[str, _Scope] = OrderedDict()

    def add(self, scope: str, tokens: Sequence[int]) -> None:
        if self.max_tokens <= 0 or not tokens:
            return
        s = self._scopes.pop(scope, None) or _Scope()
        self._scopes[scope] = s
        s.add(token_text(tokens[-self.max_tokens :]), self.max_tokens)
        while len(self._scopes) > self.max_scopes:
            self._scopes.popitem(last=False)

    def text(self, scope: str) -> str:
        """The scope's replies as one string (see `token_text`), each after a SEPARATOR."""
        s = self._scopes.get(scope)
        if s is None:
            return ""
        self._scopes.move_to_end(scope)
        return s.text()

    @property
    def tokens(self) -> int:
        return sum(s.size for s in self._scopes.values())

    def __len__(self) -> int:
        return len(self._scopes)


class _Scope:
    def __init__(self):
        self.replies: deque[str] = deque()
        self.size = 0
        self._joined: str | None = ""

    def add(self, reply: str, max_tokens: int) -> None:
        self.replies.append(reply)
        self.size += len(reply)
        while self.size > max_tokens:
            self.size -= len(self.replies.popleft())
        self._joined = None

    def text(self) -> str:
        if self._joined is None:
            self._joined = "".join(SEPARATOR + r for r in self.replies)
        return self._joined
