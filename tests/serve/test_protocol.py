"""Request validation: every kind of bad input is a 4xx with a message that says what is wrong."""

from __future__ import annotations

import base64
import io
import json
import re
import zlib

import pytest
from PIL import Image

from seechat.data.images import load_image
from seechat.serve.protocol import APIError, Limits, parse_chat_request
from tests.infer.tiny_engine import coloured, data_uri, png_bytes

MARKER = "<image>"


def body(**kw) -> bytes:
    base = {"model": "m", "messages": [{"role": "user", "content": "你好"}]}
    base.update(kw)
    return json.dumps(base).encode()


def image_message(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "图里有什么？"},
            ],
        }
    ]


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG file whose header declares width x height pixels (the data is never decoded)."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # the IHDR size fields
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def test_a_good_request_with_images_and_parameters():
    msgs = [
        {"role": "developer", "content": "你是助手。"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "看"},
                {"type": "image_url", "image_url": {"url": data_uri(coloured(0))}},
            ],
        },
        {"role": "assistant", "content": "好的"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": data_uri(coloured(1))},
                {"type": "text", "text": "比较"},
            ],
        },
    ]
    req = parse_chat_request(
        body(
            messages=msgs,
            max_tokens=7,
            temperature=0.5,
            top_p=0.9,
            top_k=5,
            seed=3,
            stop="。",
            stream=True,
            stream_options={"include_usage": True},
            user="x",
        ),
        MARKER,
    )
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant", "user"]
    assert req.messages[1]["content"] == "看<image>\n" and req.messages[3]["content"] == "<image>\n比较"
    assert len(req.images) == 2 and load_image(req.images[0]).getpixel((0, 0)) == (
        255,
        0,
        0,
    )  # not decoded yet
    p = req.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (7, 0.5, 0.9, 5, 3)
    assert req.stop == ("。",) and req.stream and req.include_usage and req.max_tokens_given
    defaults = parse_chat_request(body(), MARKER, Limits(default_max_tokens=9)).params
    assert defaults.max_new_tokens == 9 and defaults.temperature == 0.0


CASES = {
    "malformed json": (b'{"model": "m", "messages": [', "not valid JSON", "invalid_json"),
    "not an object": (b"[1, 2]", "must be a JSON object", "invalid_json"),
    "missing model": (
        json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(),
        "'model' is required",
        "missing_field",
    ),
    "missing messages": (json.dumps({"model": "m"}).encode(), "'messages' is required", "missing_field"),
    "empty messages": (body(messages=[]), "'messages' is required", "missing_field"),
    "message not an object": (body(messages=["hi"]), "messages\\[0\\] must be an object", "invalid_type"),
    "unknown role": (body(messages=[{"role": "tool", "content": "x"}]), 'role is "tool"', "invalid_role"),
    "missing role": (body(messages=[{"content": "x"}]), "role is missing", "invalid_role"),
    "content wrong type": (
        body(messages=[{"role": "user", "content": 5}]),
        "must be a string or a list",
        "invalid_type",
    ),
    "bad part": (
        body(messages=[{"role": "user", "content": [{"type": "audio"}]}]),
        "content\\[0\\] must be",
        "invalid_type",
    ),
    "text not a string": (
        body(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
        "text must be a string",
        "invalid_type",
    ),
    "marker in text": (
        body(messages=[{"role": "user", "content": "<image> hi"}]),
        "reserved image marker",
        None,
    ),
    "last not user": (
        body(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
        "last message",
        "invalid_value",
    ),
    "image from assistant": (
        body(
            messages=[
                {
                    "role": "assistant",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}],
                },
                {"role": "user", "content": "x"},
            ]
        ),
        "user messages only",
        "invalid_value",
    ),
    "max_tokens string": (body(max_tokens="10"), "'max_tokens' must be an integer", "invalid_type"),
    "max_tokens zero": (body(max_tokens=0), "between 1 and", "invalid_value"),
    "temperature bool": (body(temperature=True), "'temperature' must be a number", "invalid_type"),
    "temperature too high": (body(temperature=9), "between 0.0 and 2.0", "invalid_value"),
    "stream not bool": (body(stream="yes"), "'stream' must be true or false", "invalid_type"),
    "stop wrong": (body(stop=[1]), "'stop' must be a string or a list", "invalid_type"),
    "n > 1": (body(n=2), "only n=1", "invalid_value"),
    "presence penalty": (body(presence_penalty=0.5), "use 'repetition_penalty'", "unsupported"),
    "tools": (body(tools=[{"type": "function"}]), "'tools' is not supported", "unsupported"),
    "http url": (
        body(messages=image_message("https://example.com/cat.png")),
        "no server-side fetching",
        "image_url_not_allowed",
    ),
    "file url": (
        body(messages=image_message("file:///etc/passwd")),
        "never read by this server",
        "image_url_not_allowed",
    ),
    "bare path": (
        body(messages=image_message("/etc/passwd")),
        "never read by this server",
        "image_url_not_allowed",
    ),
    "non-image data uri": (
        body(messages=image_message("data:text/plain;base64," + base64.b64encode(b"hello").decode())),
        "not an image",
        "invalid_image",
    ),
    "not base64": (
        body(messages=image_message("data:image/png;base64,!!!")),
        "not valid base64",
        "invalid_image",
    ),
    "corrupt image": (
        body(
            messages=image_message("data:image/png;base64," + base64.b64encode(b"\x89PNG garbage").decode())
        ),
        "could not be decoded",
        "invalid_image",
    ),
    "empty image": (body(messages=image_message("data:image/png;base64,")), "empty", "invalid_image"),
    "decompression bomb": (
        body(
            messages=image_message(
                "data:image/png;base64," + base64.b64encode(bomb_png(100_000, 100_000)).decode()
            )
        ),
        "decompression bomb",
        "invalid_image",
    ),
    "too many images": (
        body(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_uri(coloured(0))}}] * 9,
                }
            ]
        ),
        "more than 8 images",
        "too_many_images",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_requests_are_400_with_a_clear_message(name):
    raw, message, code = CASES[name]
    with pytest.raises(APIError) as err:
        parse_chat_request(raw, MARKER)
    e = err.value
    assert e.status == 400 and e.type == "invalid_request_error"
    assert e.code == code
    body_ = e.body()["error"]
    assert set(body_) == {"message", "type", "param", "code"}
    assert re.search(message, body_["message"]), body_["message"]


def test_image_size_limit_is_configurable():
    raw = body(messages=image_message(data_uri(coloured(0, (200, 200)))))
    assert len(parse_chat_request(raw, MARKER).images) == 1
    with pytest.raises(APIError, match="limit of 1,000"):
        parse_chat_request(raw, MARKER, Limits(max_image_pixels=1000))


def test_bomb_header_is_checked_before_decoding():
    png = bomb_png(8_000, 8_000)  # 64 MP: over seechat's 40 MP default, under PIL's own limit
    assert Image.open(io.BytesIO(png)).size == (8_000, 8_000)  # the header really says so
    with pytest.raises(APIError, match="8000x8000 = 64,000,000 pixels, more than the limit of 40,000,000"):
        parse_chat_request(
            body(messages=image_message("data:image/png;base64," + base64.b64encode(png).decode())), MARKER
        )
