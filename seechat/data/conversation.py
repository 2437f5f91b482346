"""Rendering conversations with the LLM's own chat template, and finding what to supervise.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}` dicts, images
marked in the text by the image token (`"<image>\n图里有什么？"`). transformers' multimodal form,
content as a list of parts (`[{"type": "image"}, {"type": "text", "text": "图里有什么？"}]`), is
the same conversation: `text_messages` turns it into the string form (each image part is the image
token and a newline, text parts are their text, in order), and `accept_content_parts` puts the
same rule in front of a Jinja chat template, for exported checkpoints that other tools render.

A conversation is rendered with the tokenizer's chat template when it has one; otherwise with the
documented Chinese fallback `FALLBACK_TEMPLATE`:

    <system text>\\n            (only when there is a system message)
    问：<user text>\\n
    答：<assistant text><eos>\\n

Which characters are assistant replies is found template-agnostically: for each assistant turn i,
render messages[:i] with the generation prompt and messages[:i+1] without; the reply is the text
between the two (its end-of-turn token included, trailing whitespace not). A template for which
the first is not a prefix of the second cannot be supervised turn by turn; it gets a clear error
instead of silently wrong labels.

Prompts for generation are tokenized with `tokenize_prompt`: control tokens (the tokenizer's
special tokens and the added tokens its template writes, such as `<|im_end|>`) that appear inside
a message's text are encoded as the plain text they are, so typed text can never forge a turn
boundary; only the template itself produces control tokens.

This module does strings and token ids; it knows nothing about images or tensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from transformers.utils.chat_template_utils import encode_marked_chat, mark_control_tokens

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n' }}"
    "{% elif m['role'] == 'user' %}{{ '问：' + m['content'] + '\n' }}"
    "{% else %}{{ '答：' + m['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '答：' }}{% endif %}"
)


class TemplateError(ValueError):
    """The chat template cannot be used to supervise assistant turns."""


class NoSupervisedTokensError(ValueError):
    """A sample (or batch) would train on nothing: every label is -100."""


def _part_text(part: Any, image_token: str, where: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image":
        return image_token + "\n"
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise ValueError(
        f"{where}: a content part must be {{'type': 'image'}} or {{'type': 'text', 'text': str}}, "
        f"got {part!r}"
    )


def text_messages(messages: Sequence[dict[str, Any]], image_token: str) -> list[dict[str, Any]]:
    """Messages whose content may be a list of parts, with every content as a string (see the
    module docstring); string contents are kept as they are."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            text = "".join(_part_text(p, image_token, f"message {i} part {j}") for j, p in enumerate(content))
            m = {**m, "content": text}
        out.append(m)
    return out


def part_images(messages: Sequence[dict[str, Any]]) -> list[Any]:
    """The images that image parts carry themselves (`{"type": "image", "image": PIL.Image}`), in order."""
    return [
        p["image"]
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image" and p.get("image") is not None
    ]


def accept_content_parts(template: str, image_token: str) -> str:
    """`template` preceded by Jinja that rewrites list-of-parts messages into the string form, by
    the rule of `text_messages`, so one template renders both forms identically. The preamble
    emits no text; messages keep their other keys."""
    token = json.dumps(image_token + "\n")  # a Jinja string literal (Jinja reads JSON-style escapes)
    preamble = (
        "{% set _seechat = namespace(messages=[]) %}"
        "{% for _m in messages %}"
        "{% if _m['content'] is string %}"
        "{% set _seechat.messages = _seechat.messages + [_m] %}"
        "{% else %}"
        "{% set _text = namespace(value='') %}"
        "{% for _p in _m['content'] %}"
        "{% if _p['type'] == 'image' %}{% set _text.value = _text.value + " + token + " %}"
        "{% elif _p['type'] == 'text' %}{% set _text.value = _text.value + _p['text'] %}"
        "{% else %}{{ raise_exception('a content part must be of type image or text, not ' + _p['type']) }}"
        "{% endif %}"
        "{% endfor %}"
        "{% set _seechat.messages = _seechat.messages + [dict(_m, content=_text.value)] %}"
        "{% endif %}"
        "{% endfor %}"
        "{% set messages = _seechat.messages %}"
    )
    return preamble + template


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template the documented Chinese fallback."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE


def validate_messages(messages: Sequence[dict[str, str]]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i}: role {m.get('role')!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a string")


def render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_with_spans(
    tokenizer: Any, messages: Sequence[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the [start, end) character spans of every assistant reply."""
    validate_messages(messages)
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not upto.startswith(prefix) or not text.startswith(upto.rstrip()):
            raise TemplateError(
                f"the chat template does not render turn {i} as an extension of the earlier turns, "
                "so assistant replies cannot be located for label masking; use a template whose "
                "history renders the same as it was generated (or set tokenizer.chat_template)"
            )
        spans.append((len(prefix), len(upto.rstrip())))
    return text, spans


def tokenize_with_labels(
    tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """Token ids of `text` and labels that are -100 except on tokens starting inside a span."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(s <= start < e for s, e in spans):
            labels[k] = ids[k]
    return ids, labels


def control_tokens(tokenizer: Any, keep: Sequence[str] = ()) -> tuple[str, ...]:
    """Strings that message text must never turn into token ids: every special token, plus every
    added token the chat template writes (whitespace ones aside), minus `keep` (the image marker,
    which the processor itself places and expands)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return tuple(
        t.content
        for t in tokenizer.added_tokens_decoder.values()
        if (t.special or (t.content in template and not t.content.isspace())) and t.content not in keep
    )


def tokenize_prompt(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool = True,
    keep: Sequence[str] = (),
) -> list[int]:
    """Token ids of the rendered conversation in which no message text produces a control token.

    Control tokens found in message text are wrapped in private markers before rendering and
    encoded as plain text afterwards (transformers' `sanitize_control_tokens` machinery, with the
    image marker `keep`-t as a token); a conversation without any gives exactly the ids of
    tokenizing the rendered text. Raises ValueError when the tokenizer would produce a control
    token from its plain text (it cannot be sanitised)."""
    tokens = sorted(control_tokens(tokenizer, keep), key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, tokens)) or "(?!)")
    marked = [{**m, "content": mark_control_tokens(m["content"], pattern)} for m in messages]
    return encode_marked_chat(
        tokenizer, render(tokenizer, marked, add_generation_prompt=add_generation_prompt)
    )
