"""Translate conversation JSONL from English to Chinese with a pluggable transformers model.

Pipeline per message: protect → split into lines → look up the cache → translate the misses in
length-sorted batches → store → join → restore → check. Details:

- **Protection.** Fenced code blocks, inline code, URLs, ``<image>`` markers and numbers are
  replaced by placeholders ``[0]``, ``[1]`` … before translation and put back afterwards. Every
  placeholder must come back exactly once; otherwise the record is flagged (never silently fixed).
- **Cache.** A sqlite3 table keyed by ``sha256(translator.cache_id + "\\n" + masked line)``. Lines
  are cached *after* masking, so "3 cats" and "5 cats" share one entry, and each batch is committed
  as soon as it is translated — a re-run or a resumed run after a crash never calls the model for a
  line it has translated before. ``cache_id`` is the model id (plus a hash of the prompt template
  for causal models); change the model and nothing stale is reused.
- **Quality check.** A translated message whose CJK ratio (CJK characters / (CJK + Latin letters),
  protected spans excluded) is below ``min_cjk_ratio`` is flagged. Flagged records go to a separate
  JSONL with their reasons and the source, not to the output. Lines with no Latin letters, or that are
  already mostly Chinese, are copied through without a model call.

Backends (explicit registry :data:`TRANSLATOR_KINDS`): ``seq2seq`` (``AutoModelForSeq2SeqLM``) and
``causal`` (``AutoModelForCausalLM`` + a prompt, rendered with the tokenizer's chat template when it
has one). Real choices: ``Helsinki-NLP/opus-mt-en-zh`` (seq2seq Marian, ~300 MB, fast even on CPU,
fine for short captions and questions but literal and weak on long, technical answers) or
``Qwen/Qwen2.5-7B-Instruct`` (causal, with :data:`DEFAULT_PROMPT`; fluent, keeps placeholders
reliably, wants a GPU: bf16 fits a 24 GB card, batch 16–32). LLaVA-Instruct-150K through Qwen2.5-7B
is the recommended route for stage-2 data; opus-mt is the quick CPU baseline.

What this module is not: a data-format converter (:mod:`seechat.data.instruct` produces its input)
nor a serving engine — for millions of lines put a vLLM server behind a custom ``Translator``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from seechat.atomic import atomic_file
from seechat.data.instruct import Conversation, Message, iter_conversations
from seechat.data.jsonl import dumps_line

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "把下面的英文翻译成中文。只输出译文,不要解释,不要添加内容。"
    "形如 [0]、[1] 的占位符必须原样保留在译文中的对应位置。\n\n{text}"
)

# -- protection: mask spans that must not be translated ------------------------------------------------

_PROTECTED = re.compile(
    r"```.*?```"  # fenced code block (may span lines)
    r"|`[^`\n]+`"  # inline code
    r"|https?://[^\s)\]>]+"  # URL
    r"|<image>"  # image marker
    r"|\d+(?:[.,:]\d+)*%?",  # numbers: 3, 3.5, 1,000, 12:30, 42%
    re.DOTALL,
)
_PLACEHOLDER = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class Masked:
    """Text with protected spans replaced by ``[i]``; ``originals[i]`` is the span."""

    text: str
    originals: tuple[str, ...]


def protect(text: str) -> Masked:
    originals: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        originals.append(match.group(0))
        return f"[{len(originals) - 1}]"

    return Masked(_PROTECTED.sub(substitute, text), tuple(originals))


def restore(translated: str, masked: Masked) -> tuple[str, list[str]]:
    """Put the protected spans back; returns (text, problems) — problems empty when all survived."""
    found = [int(i) for i in _PLACEHOLDER.findall(translated)]
    problems = []
    missing = [i for i in range(len(masked.originals)) if i not in found]
    if missing:
        problems.append(f"placeholders lost: {missing}")
    duplicated = sorted({i for i in found if found.count(i) > 1})
    if duplicated:
        problems.append(f"placeholders duplicated: {duplicated}")
    unknown = sorted({i for i in found if i >= len(masked.originals)})
    if unknown:
        problems.append(f"placeholders invented: {unknown}")

    def substitute(match: re.Match[str]) -> str:
        i = int(match.group(1))
        return masked.originals[i] if i < len(masked.originals) else match.group(0)

    return _PLACEHOLDER.sub(substitute, translated), problems


# -- language checks ---------------------------------------------------------------------------------

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def cjk_ratio(text: str) -> float:
    """CJK characters / (CJK + Latin letters) with placeholders removed; 1.0 when there are neither."""
    text = _PLACEHOLDER.sub("", text)
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    return 1.0 if cjk + latin == 0 else cjk / (cjk + latin)


def needs_translation(masked_line: str) -> bool:
    """Only lines with Latin letters that are not already mostly Chinese go to the model."""
    stripped = _PLACEHOLDER.sub("", masked_line)
    return bool(_LATIN.search(stripped)) and cjk_ratio(stripped) < 0.5


# -- translators ---------------------------------------------------------------------------------------


class Translator(Protocol):
    """Anything that turns a batch of English lines into Chinese lines."""

    cache_id: str

    def translate_batch(self, texts: Sequence[str]) -> list[str]: ...


def _load(auto_class: Any, name_or_path: str, device: str, dtype: str | None) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = auto_class.from_pretrained(name_or_path, **kwargs).to(device).eval()
    return model, tokenizer


class Seq2SeqTranslator:
    """An encoder–decoder MT model (e.g. Marian opus-mt-en-zh)."""

    def __init__(
        self, model: Any, tokenizer: Any, *, model_id: str, max_new_tokens: int = 256, num_beams: int = 1
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.cache_id = f"seq2seq:{model_id}"
        self.max_new_tokens, self.num_beams = max_new_tokens, num_beams

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, device: str = "cpu", dtype: str | None = None, **kwargs: Any
    ) -> Seq2SeqTranslator:
        from transformers import AutoModelForSeq2SeqLM

        model, tokenizer = _load(AutoModelForSeq2SeqLM, name_or_path, device, dtype)
        return cls(model, tokenizer, model_id=str(name_or_path), **kwargs)

    @torch.inference_mode()
    def translate_batch(self, texts: Sequence[str]) -> list[str]:
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True)
        out = self.model.generate(
            input_ids=enc["input_ids"].to(self.model.device),
            attention_mask=enc["attention_mask"].to(self.model.device),
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class CausalTranslator:
    """A decoder-only instruction model prompted to translate (e.g. Qwen2.5-7B-Instruct)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_id: str,
        prompt_template: str = DEFAULT_PROMPT,
        max_new_tokens: int = 512,
    ) -> None:
        if "{text}" not in prompt_template:
            raise ValueError("prompt_template must contain '{text}'")
        self.model, self.tokenizer = model, tokenizer
        self.prompt_template, self.max_new_tokens = prompt_template, max_new_tokens
        template_hash = hashlib.sha256(prompt_template.encode()).hexdigest()[:12]
        self.cache_id = f"causal:{model_id}:{template_hash}"
        tokenizer.padding_side = "left"  # batched generation continues from the right edge
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, device: str = "cpu", dtype: str | None = None, **kwargs: Any
    ) -> CausalTranslator:
        from transformers import AutoModelForCausalLM

        model, tokenizer = _load(AutoModelForCausalLM, name_or_path, device, dtype)
        return cls(model, tokenizer, model_id=str(name_or_path), **kwargs)

    def prompt(self, text: str) -> str:
        content = self.prompt_template.replace("{text}", text)
        if not self.tokenizer.chat_template:
            return content
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def translate_batch(self, texts: Sequence[str]) -> list[str]:
        prompts = [self.prompt(t) for t in texts]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        input_ids = enc["input_ids"].to(self.model.device)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=enc["attention_mask"].to(self.model.device),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = out[:, input_ids.shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


TRANSLATOR_KINDS: dict[str, type[Seq2SeqTranslator] | type[CausalTranslator]] = {
    "seq2seq": Seq2SeqTranslator,
    "causal": CausalTranslator,
}


def load_translator(kind: str, name_or_path: str, **kwargs: Any) -> Translator:
    """``kind`` is ``"seq2seq"`` or ``"causal"``; kwargs go to the class (device, dtype, …)."""
    if kind not in TRANSLATOR_KINDS:
        raise ValueError(f"unknown translator kind {kind!r}; choose one of {sorted(TRANSLATOR_KINDS)}")
    return TRANSLATOR_KINDS[kind].from_pretrained(name_or_path, **kwargs)


# -- cache ----------------------------------------------------------------------------------------------


class TranslationCache:
    """Persistent (translator, masked source line) -> translation map in sqlite3."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS translations "
            "(key TEXT PRIMARY KEY, model TEXT, source TEXT, target TEXT)"
        )
        self._db.commit()

    @staticmethod
    def key(cache_id: str, source: str) -> str:
        return hashlib.sha256(f"{cache_id}\n{source}".encode()).hexdigest()

    def get_many(self, cache_id: str, sources: Iterable[str]) -> dict[str, str]:
        by_key = {self.key(cache_id, s): s for s in sources}
        found: dict[str, str] = {}
        keys = list(by_key)
        for start in range(0, len(keys), 500):  # stay under sqlite's bound-variable limit
            chunk = keys[start : start + 500]
            query = f"SELECT key, target FROM translations WHERE key IN ({','.join('?' * len(chunk))})"
            for key, target in self._db.execute(query, chunk):
                found[by_key[key]] = target
        return found

    def put_many(self, cache_id: str, pairs: Iterable[tuple[str, str]]) -> None:
        rows = [(self.key(cache_id, s), cache_id, s, t) for s, t in pairs]
        self._db.executemany("INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?)", rows)
        self._db.commit()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM translations").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> TranslationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the driver ------------------------------------------------------------------------------------------


@dataclass
class TranslateStats:
    records: int = 0
    written: int = 0
    flagged: int = 0
    lines_translated: int = 0  # lines sent to the model
    cache_hits: int = 0
    model_calls: int = 0  # translate_batch calls


@dataclass
class _PendingRecord:
    conversation: Conversation
    masked: list[Masked]  # per message
    lines: list[list[str]]  # per message: masked lines


@dataclass
class _Batcher:
    """Translates unique masked lines through the cache and the model, batch by batch."""

    translator: Translator
    cache: TranslationCache
    batch_size: int
    stats: TranslateStats
    known: dict[str, str] = field(default_factory=dict)

    def resolve(self, lines: Iterable[str]) -> None:
        todo = {line.strip() for line in lines if needs_translation(line)} - self.known.keys()
        hits = self.cache.get_many(self.translator.cache_id, todo)
        self.known.update(hits)
        self.stats.cache_hits += len(hits)
        misses = sorted(todo - hits.keys(), key=len)  # similar lengths share a batch: less padding
        for start in range(0, len(misses), self.batch_size):
            batch = misses[start : start + self.batch_size]
            outputs = self.translator.translate_batch(batch)
            self.stats.model_calls += 1
            self.stats.lines_translated += len(batch)
            self.cache.put_many(self.translator.cache_id, zip(batch, outputs, strict=True))
            self.known.update(zip(batch, outputs, strict=True))

    def line(self, masked_line: str) -> str:
        if not needs_translation(masked_line):
            return masked_line
        indent = masked_line[: len(masked_line) - len(masked_line.lstrip())]
        return indent + self.known[masked_line.strip()]


def _prepare(conversation: Conversation) -> _PendingRecord:
    masked = [protect(m.content) for m in conversation.messages]
    return _PendingRecord(conversation, masked, [m.text.split("\n") for m in masked])


def _finish(
    record: _PendingRecord, batcher: _Batcher, min_cjk_ratio: float
) -> tuple[Conversation, list[str]]:
    """The translated conversation and the reasons to flag it (empty: fine)."""
    reasons, messages = [], []
    for i, (message, masked, lines) in enumerate(
        zip(record.conversation.messages, record.masked, record.lines, strict=True)
    ):
        translated = "\n".join(batcher.line(line) for line in lines)
        text, problems = restore(translated, masked)
        reasons += [f"message {i}: {p}" for p in problems]
        if any(needs_translation(line) for line in lines):
            ratio = cjk_ratio(translated)
            if ratio < min_cjk_ratio:
                reasons.append(f"message {i}: CJK ratio {ratio:.2f} < {min_cjk_ratio}")
        messages.append(Message(message.role, text))
    return replace(record.conversation, messages=messages), reasons


def translate_conversations(
    conversations: Iterable[Conversation],
    translator: Translator,
    cache: TranslationCache,
    *,
    batch_size: int = 16,
    min_cjk_ratio: float = 0.3,
    stats: TranslateStats | None = None,
    chunk_lines: int = 1024,
) -> Iterator[tuple[Conversation, list[str]]]:
    """Yield (translated conversation, flag reasons) in input order.

    Records are gathered until about ``chunk_lines`` lines are pending, so batches are full and
    sorted by length without holding the whole file in memory.
    """
    stats = stats if stats is not None else TranslateStats()
    batcher = _Batcher(translator, cache, batch_size, stats)
    pending: list[_PendingRecord] = []
    pending_lines = 0
    for conversation in conversations:
        record = _prepare(conversation)
        pending.append(record)
        pending_lines += sum(map(len, record.lines))
        if pending_lines >= chunk_lines:
            yield from _flush(pending, batcher, min_cjk_ratio, stats)
            pending, pending_lines = [], 0
    yield from _flush(pending, batcher, min_cjk_ratio, stats)


def _flush(
    pending: list[_PendingRecord], batcher: _Batcher, min_cjk_ratio: float, stats: TranslateStats
) -> Iterator[tuple[Conversation, list[str]]]:
    batcher.resolve(line for record in pending for lines in record.lines for line in lines)
    for record in pending:
        stats.records += 1
        yield _finish(record, batcher, min_cjk_ratio)
    batcher.known.clear()  # the cache holds everything; keep memory flat


def translate_file(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    translator: Translator,
    *,
    cache_path: str | os.PathLike[str],
    flagged_path: str | os.PathLike[str] | None = None,
    batch_size: int = 16,
    min_cjk_ratio: float = 0.3,
    progress: bool = False,
) -> TranslateStats:
    """Translate our conversation JSONL ``source`` into ``destination``.

    Flagged records go to ``flagged_path`` (default ``<destination stem>.flagged.jsonl``) as
    ``{"id", "reasons", "translation", "source"}``. Both files are written under temporary names, synced
    and renamed at the end; an interrupted run is resumed by running it again (the cache answers
    everything already translated).
    """
    destination = Path(destination)
    flagged_path = (
        Path(flagged_path) if flagged_path else destination.with_name(destination.stem + ".flagged.jsonl")
    )
    stats = TranslateStats()
    in_flight: deque[Conversation] = deque()  # sources of the records not yet written (one chunk)
    conversations = _remember(iter_conversations(source, "messages"), in_flight)
    with (
        atomic_file(
            destination
        ) as tmp_out,  # outputs appear only when complete; the cache keeps the work done
        atomic_file(flagged_path) as tmp_flagged,
        TranslationCache(cache_path) as cache,
        tmp_out.open("w", encoding="utf-8") as out,
        tmp_flagged.open("w", encoding="utf-8") as flagged,
    ):
        results = translate_conversations(
            conversations,
            translator,
            cache,
            batch_size=batch_size,
            min_cjk_ratio=min_cjk_ratio,
            stats=stats,
        )
        for conversation, reasons in _progress(results, progress):
            _write(conversation, reasons, in_flight.popleft(), out, flagged, stats)
    return stats


def _write(
    conversation: Conversation,
    reasons: list[str],
    source: Conversation,
    out: Any,
    flagged: Any,
    stats: TranslateStats,
) -> None:
    if reasons:
        stats.flagged += 1
        row = {
            "id": conversation.id,
            "reasons": reasons,
            "translation": conversation.to_dict(),
            "source": source.to_dict(),
        }
        flagged.write(dumps_line(row))
    else:
        stats.written += 1
        out.write(dumps_line(conversation.to_dict()))


def _remember(conversations: Iterable[Conversation], store: deque[Conversation]) -> Iterator[Conversation]:
    for conversation in conversations:
        store.append(conversation)
        yield conversation


def _progress(items: Iterable[Any], enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, unit="conv", desc="translate")
