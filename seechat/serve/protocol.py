"""The OpenAI chat-completions wire format: validate a request, shape responses and errors.

`parse_chat_request` turns the raw body of `POST /v1/chat/completions` into a `ChatRequest`
(seechat messages with `<image>` markers, the images' encoded bytes, sampling parameters) or
raises an `APIError` whose `status` and `body()` are what OpenAI would answer: a 4xx with
`{"error": {"message", "type", "param", "code"}}` that says exactly what is wrong. Every field is
checked for its JSON type and its range, so that no value a client can send reaches a later layer
as an exception (a 500): integers of any size, floats such as 1e400 or NaN, lone surrogates in
strings, nesting deep enough to exhaust the parser, image markers assembled from two text parts.

Images come only inline, as `data:image/...;base64,...` URIs. This server never fetches an
http(s) URL and never reads a `file://` URL or a path: both are refused with a message saying how
to send the image instead. Each image's format (allow-list, read from the bytes: the declared
media type is not trusted) and declared size are checked here without decoding a pixel
(`seechat.data.images.probe_image`); the server decodes them later, a bounded number at a time.
Cheap bounds reject a request that cannot fit the model's context before its prompt is rendered
or tokenized: its images' tokens plus a lower bound on its text's tokens (its characters over the
most characters any one token covers).

No FastAPI here: this module is plain functions over dicts, tested directly.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from seechat.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, probe_image
from seechat.infer.sampling import SamplingParams

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_aspect: float = 50.0  # long side / short side: a vision processor scales the short side up
    max_images: int = 8
    max_tokens: int = 4096  # the most a request may ask for
    default_max_tokens: int = 512
    default_temperature: float = 0.0  # omitted temperature: greedy (deterministic) by default
    max_stops: int = 16  # stop strings per request
    max_stop_chars: int = 512  # their total length
    # The cheap context bound (0 = not checked here; the server fills these from its model):
    context_tokens: int = 0  # the model's context
    tokens_per_image: int = 0  # tokens one image takes in the prompt
    max_token_chars: int = 0  # the most characters one token of the tokenizer covers


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]  # seechat form: role + content with <image> markers
    images: list[bytes]  # encoded, format and size checked, not decoded
    params: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    max_tokens_given: bool = False
    ignore_eos: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _shown(v: Any) -> str:
    """A short rendering of a client's value for an error message (never huge, never raising)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10**30:
        return f"an integer of {len(str(abs(v))) if v.bit_length() < 14_000 else 'over 4000'} digits"
    try:
        return json.dumps(v, ensure_ascii=True)[:40]
    except (ValueError, TypeError, RecursionError):
        return type(v).__name__


def _string(v: Any, param: str, what: str) -> str:
    if not isinstance(v, str):
        raise _bad(f"{param} must be {what}, got {_shown(v)}", param, "invalid_type")
    if _SURROGATE.search(v):
        raise _bad(f"{param} is not valid Unicode (it contains a lone surrogate)", param, "invalid_value")
    return v


def _number(body: dict, name: str, lo: float, hi: float, default: float, integer: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
        raise _bad(f"'{name}' must be {kind}, got {_shown(v)}", name, "invalid_type")
    # ints are compared exactly (float(10**400) would overflow); floats may be inf or NaN (JSON's 1e400, NaN)
    if (isinstance(v, float) and not math.isfinite(v)) or not lo <= v <= hi:
        raise _bad(f"'{name}' must be between {lo} and {hi}, got {_shown(v)}", name, "invalid_value")
    return v


def decode_image_url(url: Any, limits: Limits, param: str) -> bytes:
    """An inline data URI -> the image's bytes, its format and size checked (no pixel decoded);
    anything that would make the server fetch or read -> 400."""
    if not isinstance(url, str) or not url:
        raise _bad(
            "'image_url.url' must be a non-empty string (a data:image/...;base64,... URI)",
            param,
            "invalid_type",
        )
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme in ("http", "https"):
        raise _bad(
            "remote image URLs are not fetched: this server does no server-side fetching. Send the image "
            "inline as 'data:image/png;base64,...' (read the file and base64-encode it on the client)",
            param,
            "image_url_not_allowed",
        )
    if scheme != "data":
        raise _bad(
            "file URLs and paths are never read by this server; send the image inline as "
            "'data:image/png;base64,...'",
            param,
            "image_url_not_allowed",
        )
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise _bad("malformed data URI: no ',' between the media type and the data", param, "invalid_image")
    parts = [p.strip().lower() for p in header.split(";")]
    media = parts[0]
    if not media.startswith("image/"):
        raise _bad(
            f"the data URI is not an image (media type {_shown(media) if media else 'missing'}); "
            "send data:image/...",
            param,
            "invalid_image",
        )
    if "base64" not in parts[1:]:
        raise _bad(
            "image data URIs must be base64-encoded (data:image/png;base64,...)", param, "invalid_image"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the image data is not valid base64", param, "invalid_image") from None
    try:
        w, h = probe_image(data, limits.max_image_pixels).size
    except ImageError as e:
        raise _bad(str(e), param, "invalid_image") from None
    if max(w, h) > limits.max_image_aspect * min(w, h):
        # the vision processor resizes the short side to its input size: a 2 x 200,000 image would
        # become 336 x 33,600,000 pixels (34 GB) before the crop
        raise _bad(
            f"the image is {w}x{h}: its sides differ by more than {limits.max_image_aspect:g} times "
            "(crop or pad it first)",
            param,
            "invalid_image",
        )
    return data


def _message(
    m: Any, i: int, marker: str, limits: Limits, image_urls: list[tuple[Any, str]]
) -> dict[str, str]:
    """One message -> seechat form; its image parts are queued in `image_urls` (decoded later)."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:
        shown = _shown(role) if role is not None else "missing"
        raise _bad(
            f"{where}.role is {shown}; it must be one of system, developer, user, assistant",
            f"{where}.role",
            "invalid_role",
        )
    content = m.get("content")
    if isinstance(content, str):
        text = _string(content, f"{where}.content", "a string")
    elif isinstance(content, list):
        pieces, n_images = [], 0
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str) or kind not in ("text", "image_url"):
                raise _bad(
                    f"{pw} must be {{'type': 'text', 'text': ...}} or "
                    "{'type': 'image_url', 'image_url': {'url': ...}}",
                    pw,
                    "invalid_type",
                )
            if kind == "text":
                piece = _string(part.get("text"), f"{pw}.text", "a string")
                if marker in piece:
                    raise _bad(
                        f"{pw}.text contains the reserved image marker {marker!r}; "
                        "send images as image_url parts",
                        f"{pw}.text",
                    )
                pieces.append(piece)
                continue
            if role != "user":
                raise _bad(f"{pw}: images are accepted in user messages only", pw, "invalid_value")
            if len(image_urls) >= limits.max_images:
                raise _bad(f"more than {limits.max_images} images in one request", pw, "too_many_images")
            spec = part.get("image_url")
            image_urls.append((spec.get("url") if isinstance(spec, dict) else spec, f"{pw}.image_url.url"))
            pieces.append(f"{marker}\n")
            n_images += 1
        text = "".join(pieces)
        if text.count(marker) != n_images:  # e.g. "<ima" + "ge>" in two text parts
            raise _bad(
                f"{where}: its text parts join into the reserved image marker {marker!r}; send images as "
                "image_url parts",
                f"{where}.content",
            )
        return {"role": ROLES[role], "content": text}
    elif content is None and role == "assistant":
        text = ""
    else:
        raise _bad(
            f"{where}.content must be a string or a list of content parts", f"{where}.content", "invalid_type"
        )
    if marker in text:
        raise _bad(
            f"{where}: text contains the reserved image marker {marker!r}; send images as image_url parts",
            where,
        )
    return {"role": ROLES[role], "content": text}


def _check_context_bound(messages: list[dict[str, str]], n_images: int, marker: str, limits: Limits) -> None:
    """Refuse, before rendering or tokenizing anything, a request that cannot fit the context:
    every image takes `tokens_per_image` tokens, and no token covers more than `max_token_chars`
    characters of text, so the prompt has at least images x tokens + characters / max_token_chars
    tokens (assuming the template keeps each message's text, as chat templates do)."""
    ctx = limits.context_tokens
    if ctx <= 0:
        return
    chars = sum(len(m["content"]) for m in messages) - n_images * (len(marker) + 1)
    text_tokens = -(-chars // limits.max_token_chars) if limits.max_token_chars > 0 else 0
    least = n_images * limits.tokens_per_image + text_tokens
    if least >= ctx:
        raise _bad(
            f"this model's context is {ctx} tokens, but the messages are at least {least:,} tokens "
            f"({n_images} image(s) x {limits.tokens_per_image} tokens, and {chars:,} characters of text that "
            f"take at least {text_tokens:,} tokens); send fewer images or a shorter conversation",
            "messages",
            "context_length_exceeded",
        )


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(f"'{name}' must be true or false", name, "invalid_type")
    return v


def parse_chat_request(raw: bytes, marker: str, limits: Limits = Limits()) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (
        ValueError,
        RecursionError,
    ) as e:  # JSONDecodeError, bad UTF-8, integers of > 4300 digits, deep nesting
        shown = str(e)[:200] if not isinstance(e, RecursionError) else "nested too deeply"
        raise _bad(f"the request body is not valid JSON ({shown})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string (see GET /v1/models)", "model", "missing_field")
    _string(model, "model", "a string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' is required and must be a non-empty list", "messages", "missing_field")
    image_urls: list[tuple[Any, str]] = []
    converted = [_message(m, i, marker, limits, image_urls) for i, m in enumerate(messages)]
    if converted[-1]["role"] != "user":
        raise _bad(
            "the last message must be from the user", f"messages[{len(messages) - 1}].role", "invalid_value"
        )
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad("only n=1 is supported", "n", "invalid_value")
    for name in ("frequency_penalty", "presence_penalty"):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or v != 0):
            raise _bad(
                f"'{name}' is not supported; use 'repetition_penalty' (1.0 = off)", name, "unsupported"
            )
    for name in ("tools", "functions", "tool_choice", "logprobs", "response_format"):
        v = body.get(name)
        if v is not None and v is not False and v != [] and v != "none" and v != {"type": "text"}:
            raise _bad(f"'{name}' is not supported by this server", name, "unsupported")
    given = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = int(
        _number({name: given}, name, 1, limits.max_tokens, limits.default_max_tokens, integer=True)
    )
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _bad(f"'seed' must be an integer, got {_shown(seed)}", "seed", "invalid_type")
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise _bad(
                f"'seed' must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {_shown(seed)}",
                "seed",
                "invalid_value",
            )
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > limits.max_stops
        or not all(isinstance(s, str) for s in stop)
    ):
        raise _bad(
            f"'stop' must be a string or a list of at most {limits.max_stops} strings", "stop", "invalid_type"
        )
    for s in stop:
        _string(s, "stop", "a string")
    if sum(map(len, stop)) > limits.max_stop_chars:
        raise _bad(
            f"the stop strings are {sum(map(len, stop)):,} characters in all; the limit is "
            f"{limits.max_stop_chars}",
            "stop",
            "invalid_value",
        )
    stream = _flag(body, "stream")
    ignore_eos = _flag(body, "ignore_eos")  # vLLM's extension: exactly max_tokens (benchmarks)
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _flag(options, "include_usage")
    temperature = _number(body, "temperature", 0.0, 2.0, limits.default_temperature)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0:  # only the most likely token survives: greedy
        temperature, top_p = 0.0, 1.0
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(_number(body, "top_k", 0, 1 << 30, 0, integer=True)),
        repetition_penalty=float(_number(body, "repetition_penalty", 0.01, 10.0, 1.0)),
        seed=seed,
    )
    _check_context_bound(converted, len(image_urls), marker, limits)
    images = [decode_image_url(url, limits, param) for url, param in image_urls]
    return ChatRequest(
        model=model,
        messages=converted,
        images=images,
        params=params,
        stop=tuple(stop),
        stream=stream,
        include_usage=include_usage,
        max_tokens_given=given is not None,
        ignore_eos=ignore_eos,
    )


# ---------------------------------------------------------------- responses


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(
    cid: str, model: str, text: str, finish_reason: str, use: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        ],
        "usage": use,
    }


def chunk_body(
    cid: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    use: dict[str, Any] | None = None,
    choices: bool = True,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if choices else [],
    }
    if use is not None:
        body["usage"] = use
    return body


def sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
