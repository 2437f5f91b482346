"""The project's conversation record and converters from public instruction-data formats.

:class:`Conversation` is what stage-2 training, translation and evaluation read: an id, image paths
(relative to an image root directory) and ``system``/``user``/``assistant`` messages in which
``<image>`` marks where each image goes, in order. On disk it is one JSON object per line::

    {"id": "...", "images": ["coco/1.jpg"], "messages": [{"role": "user", "content": "<image>\\n..."}, ...]}

Converters (explicit registry :data:`CONVERTERS`, chosen by ``format`` or auto-detected):

- ``llava``: LLaVA-Instruct JSON / JSONL, ``{"id", "image", "conversations": [{"from", "value"}]}``;
  ``from`` is human/gpt/system (user/assistant accepted); ``image`` absent, a string or a list.
- ``minigpt4``: MiniGPT-4 ``filter_cap.json``, ``{"annotations": [{"image_id", "caption"}]}``; each
  caption becomes a one-turn caption conversation whose question is ``caption_instruction``.
- ``messages``: ShareGPT/OpenAI-style JSONL, ``{"messages": [{"role", "content"}], "images": [...]}``
  (``id`` optional; content may be a list of ``{"type": "text"|"image"}`` parts). Our own JSONL is
  this format, so ``messages`` also reads it back.

Normalisation and validation (every converter): when a record has images but no ``<image>``
marker, one ``<image>\\n`` is put at the start of the first user message (LLaVA's convention);
otherwise the number of markers must equal ``len(images)``. Markers may only appear in user
messages. After an optional leading system message, roles must alternate user, assistant, …,
ending with an assistant reply; contents must be non-empty. With ``image_root`` given, every image
file must exist inside it (:func:`image_path`: a path that leads outside the root is refused, as
the trainer refuses it). Any violation raises :class:`DataFormatError` naming the file, line or record
index and record id.

What this module is not: chat-template rendering or label masking (``seechat.data.conversation``),
nor translation (:mod:`seechat.data.translate`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from seechat.atomic import atomic_file
from seechat.data.jsonl import JsonlError, enumerate_jsonl, write_jsonl

IMAGE_MARKER = "<image>"
ROLES = ("system", "user", "assistant")
DEFAULT_CAPTION_INSTRUCTION = "<image>\n请详细描述这张图片。"
LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class DataFormatError(ValueError):
    """A record that cannot be converted or fails validation; says where and which."""

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None, where: str, record_id: str | None
    ):
        self.path, self.where, self.record_id, self.reason = path, where, record_id, message
        super().__init__(f"{path or '<records>'}: {where} (id={record_id!r}): {message}")


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Conversation:
    id: str
    images: list[str] = field(default_factory=list)  # paths relative to the image root
    messages: list[Message] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Conversation:
        messages = [Message(m["role"], m["content"]) for m in record["messages"]]
        return cls(id=str(record["id"]), images=list(record.get("images", [])), messages=messages)


# -- raw record reading ---------------------------------------------------------------------------------


def _read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) from a JSON array / object file or a JSONL file."""
    if path.suffix.lower() == ".jsonl" or _looks_like_jsonl(path):
        yield from _read_jsonl(path)
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"invalid JSON ({e})", path=path, where="file", record_id=None) from e
    if isinstance(data, dict) and "annotations" in data:  # MiniGPT-4 wraps its records
        data = data["annotations"]
    if not isinstance(data, list):
        data = [data]
    for index, record in enumerate(data):
        yield f"record {index}", record


def _looks_like_jsonl(path: Path) -> bool:
    """A ``.json`` file holding JSON lines: its first line is a whole object and more lines follow."""
    with path.open(encoding="utf-8") as f:
        first = f.readline().strip()
        more = any(line.strip() for line in f)
    if not (first.startswith("{") and more):
        return False
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    return True


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        for line_no, record in enumerate_jsonl(path):
            yield f"line {line_no}", record
    except JsonlError as e:
        raise DataFormatError(
            f"invalid JSON ({e.reason})", path=path, where=f"line {e.line}", record_id=None
        ) from e


# -- converters: raw record -> Conversation (raise ValueError with a reason; the caller adds the place) --


@dataclass(frozen=True)
class ConvertOptions:
    caption_instruction: str = DEFAULT_CAPTION_INSTRUCTION  # MiniGPT-4 captions
    image_template: str = "{image_id}.jpg"  # MiniGPT-4: file name of an image_id


def _image_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"image(s) must be a string or a list of strings, got {type(value).__name__}")


def _require(record: Any, key: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"missing {key!r}")
    return record[key]


def from_llava(record: Any, index: int, options: ConvertOptions) -> Conversation:
    turns = _require(record, "conversations")
    if not isinstance(turns, list):
        raise ValueError("'conversations' must be a list")
    messages = []
    for turn in turns:
        speaker = str(_require(turn, "from")).lower()
        if speaker not in LLAVA_ROLES:
            raise ValueError(f"unknown speaker {speaker!r} (expected one of {sorted(LLAVA_ROLES)})")
        messages.append(Message(LLAVA_ROLES[speaker], _text(_require(turn, "value"))))
    return Conversation(str(record.get("id", index)), _image_list(record.get("image")), messages)


def from_minigpt4(record: Any, index: int, options: ConvertOptions) -> Conversation:
    image_id = str(_require(record, "image_id"))
    caption = _text(_require(record, "caption"))
    messages = [Message("user", options.caption_instruction), Message("assistant", caption)]
    return Conversation(image_id, [options.image_template.format(image_id=image_id)], messages)


def from_messages(record: Any, index: int, options: ConvertOptions) -> Conversation:
    raw_messages = _require(record, "messages")
    if not isinstance(raw_messages, list):
        raise ValueError("'messages' must be a list")
    messages = []
    for m in raw_messages:
        role = str(_require(m, "role"))
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (expected one of {list(ROLES)})")
        messages.append(Message(role, _content_text(_require(m, "content"))))
    return Conversation(str(record.get("id", index)), _image_list(record.get("images")), messages)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"text must be a string, got {type(value).__name__}")
    return value


def _content_text(content: Any) -> str:
    """A string, or OpenAI-style parts: text parts joined, each image part becomes a marker."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"content must be a string or a list of parts, got {type(content).__name__}")
    pieces = []
    for part in content:
        kind = _require(part, "type")
        if kind == "text":
            pieces.append(_text(_require(part, "text")))
        elif kind in ("image", "image_url"):
            pieces.append(IMAGE_MARKER + "\n")
        else:
            raise ValueError(f"unsupported content part type {kind!r}")
    return "".join(pieces)


Converter = Callable[[Any, int, ConvertOptions], Conversation]
CONVERTERS: dict[str, Converter] = {"llava": from_llava, "minigpt4": from_minigpt4, "messages": from_messages}


def detect_format(record: Any) -> str:
    """The converter name for a raw record, from its keys."""
    if isinstance(record, dict):
        if "conversations" in record:
            return "llava"
        if "messages" in record:
            return "messages"
        if "image_id" in record and "caption" in record:
            return "minigpt4"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"cannot detect the format from keys {keys}; pass format= one of {sorted(CONVERTERS)}")


# -- normalisation and validation -------------------------------------------------------------------------


def insert_missing_marker(conversation: Conversation) -> Conversation:
    """Put one ``<image>\\n`` at the start of the first user message when images have no marker."""
    if not conversation.images or any(IMAGE_MARKER in m.content for m in conversation.messages):
        return conversation
    messages = list(conversation.messages)
    for i, m in enumerate(messages):
        if m.role == "user":
            messages[i] = Message("user", IMAGE_MARKER + "\n" + m.content)
            break
    return Conversation(conversation.id, conversation.images, messages)


def validation_errors(
    conversation: Conversation, image_root: str | os.PathLike[str] | None = None
) -> list[str]:
    """Everything wrong with a conversation (empty list: valid)."""
    errors = []
    if not conversation.id:
        errors.append("empty id")
    roles = [m.role for m in conversation.messages]
    body = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or body != expected[: len(body)] or body[-1] != "assistant":
        errors.append(f"roles must be [system] user assistant (user assistant)*, got {roles}")
    for i, m in enumerate(conversation.messages):
        if not m.content.strip():
            errors.append(f"message {i} ({m.role}) is empty")
        if IMAGE_MARKER in m.content and m.role != "user":
            errors.append(f"message {i} ({m.role}) has an {IMAGE_MARKER} marker; only user messages may")
    markers = sum(m.content.count(IMAGE_MARKER) for m in conversation.messages)
    if markers != len(conversation.images):
        errors.append(f"{markers} {IMAGE_MARKER} markers but {len(conversation.images)} images")
    if image_root is not None:
        missing = []
        for p in conversation.images:
            try:
                if not image_path(image_root, p).is_file():
                    missing.append(p)
            except ImagePathError as e:
                errors.append(str(e))
        if missing:
            errors.append(f"image files not found under {image_root}: {missing}")
    return errors


class ImagePathError(ValueError):
    """An image path in a data file points outside its image root."""


def image_path(image_root: str | os.PathLike[str], name: str) -> Path:
    """Where image ``name`` of a data file is: under ``image_root``, never outside it.

    The check is on the path as written (``..`` and absolute paths are resolved lexically): a row
    cannot reach ``/etc/passwd`` or ``../../secrets``, while a symbolic link the root's owner put
    inside the root (``images -> /mnt/big/images``) still works. Raises :class:`ImagePathError`."""
    root = Path(os.path.abspath(image_root))
    path = Path(os.path.normpath(root / name))  # an absolute name replaces the root here
    if not path.is_relative_to(root):
        raise ImagePathError(
            f"image path {name!r} leads outside the image root {root}; paths in data files must stay "
            "inside it (set data.image_root / --image-root to the folder that holds the images)"
        )
    return path


# -- public entry points ----------------------------------------------------------------------------------


def iter_conversations(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    image_root: str | os.PathLike[str] | None = None,
    options: ConvertOptions | None = None,
) -> Iterator[Conversation]:
    """Stream validated conversations from ``path`` (JSONL is never loaded whole)."""
    path = Path(path)
    options = options or ConvertOptions()
    if format != "auto" and format not in CONVERTERS:
        raise ValueError(f"unknown format {format!r}; choose 'auto' or one of {sorted(CONVERTERS)}")
    converter = CONVERTERS.get(format)
    for index, (where, record) in enumerate(_read_records(path)):
        record_id = str(record.get("id", record.get("image_id", index))) if isinstance(record, dict) else None
        try:
            converter = converter or CONVERTERS[detect_format(record)]
            conversation = insert_missing_marker(converter(record, index, options))
        except ValueError as e:
            raise DataFormatError(str(e), path=path, where=where, record_id=record_id) from e
        errors = validation_errors(conversation, image_root)
        if errors:
            raise DataFormatError("; ".join(errors), path=path, where=where, record_id=conversation.id)
        yield conversation


def load_conversations(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    image_root: str | os.PathLike[str] | None = None,
    options: ConvertOptions | None = None,
) -> list[Conversation]:
    """Read, convert and validate every record of ``path``; see the module docstring."""
    return list(iter_conversations(path, format, image_root=image_root, options=options))


def write_conversations(conversations: Iterable[Conversation], path: str | os.PathLike[str]) -> int:
    """Write our JSONL (UTF-8, one conversation per line; crash-safe); returns the count."""
    return write_jsonl(path, (conversation.to_dict() for conversation in conversations))


def convert_file(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    format: str = "auto",
    *,
    image_root: str | os.PathLike[str] | None = None,
    options: ConvertOptions | None = None,
) -> int:
    """``source`` (any supported format) -> our JSONL at ``destination``; returns the count.

    Written to a temporary name, synced and renamed (`seechat.atomic.atomic_file`), so a failed or
    killed conversion leaves no partial output and the previous ``destination`` in place.
    """
    with atomic_file(destination) as tmp:
        count = write_conversations(
            iter_conversations(source, format, image_root=image_root, options=options), tmp
        )
    return count
