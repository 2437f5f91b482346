"""The OpenAI chat-completions wire format: validate a request, shape responses and errors.

`parse_chat_request` turns the raw body of `POST /v1/chat/completions` into a `ChatRequest`
(seechat messages with `<image>` markers, decoded PIL images, sampling parameters) or raises an
`APIError` whose `status` and `body()` are what OpenAI would answer: a 4xx with
`{"error": {"message", "type", "param", "code"}}` that says exactly what is wrong.

Images come only inline, as `data:image/...;base64,...` URIs. This server never fetches an
http(s) URL and never reads a `file://` URL or a path: both are refused with a message saying how
to send the image instead. Declared image sizes are checked before any pixel is decoded.

No FastAPI here: this module is plain functions over dicts, tested directly.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from seechat.infer.generate import SamplingParams
from seechat.infer.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, open_image_bytes

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
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
    max_images: int = 8
    max_tokens: int = 4096  # the most a request may ask for
    default_max_tokens: int = 512
    default_temperature: float = 0.0  # omitted temperature: greedy (deterministic) by default


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]  # seechat form: role + content with <image> markers
    images: list[Image.Image]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    max_tokens_given: bool = False
    ignore_eos: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: dict, name: str, lo: float, hi: float, default: float, integer: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
        raise _bad(f"'{name}' must be {kind}, got {json.dumps(v)[:40]}", name, "invalid_type")
    if not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(f"'{name}' must be between {lo} and {hi}, got {v}", name, "invalid_value")
    return v


def decode_image_url(url: Any, limits: Limits, param: str) -> Image.Image:
    """An inline data URI -> RGB image; anything that would make the server fetch or read -> 400."""
    if not isinstance(url, str) or not url:
        raise _bad("'image_url.url' must be a non-empty string (a data:image/...;base64,... URI)", param, "invalid_type")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise _bad(
            "remote image URLs are not fetched: this server does no server-side fetching. Send the image "
            "inline as 'data:image/png;base64,...' (read the file and base64-encode it on the client)",
            param, "image_url_not_allowed",
        )
    if scheme != "data":
        raise _bad(
            "file URLs and paths are never read by this server; send the image inline as "
            "'data:image/png;base64,...'",
            param, "image_url_not_allowed",
        )
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise _bad("malformed data URI: no ',' between the media type and the data", param, "invalid_image")
    parts = [p.strip().lower() for p in header.split(";")]
    media = parts[0]
    if not media.startswith("image/"):
        raise _bad(f"the data URI is not an image (media type {media or 'missing'!r}); send data:image/...", param, "invalid_image")
    if "base64" not in parts[1:]:
        raise _bad("image data URIs must be base64-encoded (data:image/png;base64,...)", param, "invalid_image")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the image data is not valid base64", param, "invalid_image") from None
    try:
        return open_image_bytes(data, limits.max_image_pixels)
    except ImageError as e:
        raise _bad(str(e), param, "invalid_image") from None


def _message(m: Any, i: int, marker: str, limits: Limits, images: list[Image.Image]) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise _bad(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
    role = m.get("role")
    if role not in ROLES:
        shown = json.dumps(role) if role is not None else "missing"
        raise _bad(f"{where}.role is {shown}; it must be one of system, developer, user, assistant", f"{where}.role", "invalid_role")
    content = m.get("content")
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        pieces = []
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
                raise _bad(f"{pw} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', 'image_url': {{'url': ...}}}}", pw, "invalid_type")
            if part["type"] == "text":
                if not isinstance(part.get("text"), str):
                    raise _bad(f"{pw}.text must be a string", f"{pw}.text", "invalid_type")
                if marker in part["text"]:
                    raise _bad(
                        f"{pw}.text contains the reserved image marker {marker!r}; send images as image_url parts",
                        f"{pw}.text",
                    )
                pieces.append(part["text"])
                continue
            if role != "user":
                raise _bad(f"{pw}: images are accepted in user messages only", pw, "invalid_value")
            if len(images) >= limits.max_images:
                raise _bad(f"more than {limits.max_images} images in one request", pw, "too_many_images")
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            images.append(decode_image_url(url, limits, f"{pw}.image_url.url"))
            pieces.append(f"{marker}\n")
        return {"role": ROLES[role], "content": "".join(pieces)}
    elif content is None and role == "assistant":
        text = ""
    else:
        raise _bad(f"{where}.content must be a string or a list of content parts", f"{where}.content", "invalid_type")
    if marker in text:
        raise _bad(f"{where}: text contains the reserved image marker {marker!r}; send images as image_url parts", where)
    return {"role": ROLES[role], "content": text}


def parse_chat_request(raw: bytes, marker: str, limits: Limits = Limits()) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"the request body is not valid JSON ({e})", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string (see GET /v1/models)", "model", "missing_field")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' is required and must be a non-empty list", "messages", "missing_field")
    images: list[Image.Image] = []
    converted = [_message(m, i, marker, limits, images) for i, m in enumerate(messages)]
    if converted[-1]["role"] != "user":
        raise _bad("the last message must be from the user", f"messages[{len(messages) - 1}].role", "invalid_value")
    if body.get("n") not in (None, 1):
        raise _bad("only n=1 is supported", "n", "invalid_value")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _bad(f"'{name}' is not supported; use 'repetition_penalty' (1.0 = off)", name, "unsupported")
    for name in ("tools", "functions", "tool_choice", "logprobs", "response_format"):
        if body.get(name) not in (None, False, [], "none", {"type": "text"}):
            raise _bad(f"'{name}' is not supported by this server", name, "unsupported")
    given = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = int(_number({name: given}, name, 1, limits.max_tokens, limits.default_max_tokens, integer=True))
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("'seed' must be an integer", "seed", "invalid_type")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) for s in stop):
        raise _bad("'stop' must be a string or a list of at most 16 strings", "stop", "invalid_type")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream", "invalid_type")
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: exactly max_tokens (benchmarks)
    if not isinstance(ignore_eos, bool):
        raise _bad("'ignore_eos' must be true or false", "ignore_eos", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    temperature = _number(body, "temperature", 0.0, 2.0, limits.default_temperature)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0:  # only the most likely token survives: greedy
        temperature, top_p = 0.0, 1.0
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=int(_number(body, "top_k", 0, 1 << 30, 0, integer=True)),
        repetition_penalty=_number(body, "repetition_penalty", 0.01, 10.0, 1.0),
        seed=seed,
    )
    return ChatRequest(
        model=model, messages=converted, images=images, params=params, stop=tuple(stop), stream=stream,
        include_usage=bool(options.get("include_usage", False)), max_tokens_given=given is not None,
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


def completion_body(cid: str, model: str, text: str, finish_reason: str, use: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": use,
    }


def chunk_body(cid: str, model: str, delta: dict[str, Any], finish_reason: str | None = None,
               use: dict[str, Any] | None = None, choices: bool = True) -> dict[str, Any]:
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
