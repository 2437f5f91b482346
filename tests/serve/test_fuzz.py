"""Fuzz the chat-completions schema: every field, every JSON type, every boundary. Whatever a
client sends, the answer is a success or an OpenAI-shaped 4xx: never an exception escaping the
validator, never a 500 from the server (issue 14, item 12)."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from seechat.serve.protocol import APIError, ChatRequest, Limits, parse_chat_request
from tests.serve.conftest import MODEL_NAME, make_server

MARKER = "<image>"
LIMITS = Limits(
    max_tokens=4,
    default_max_tokens=2,
    max_images=4,
    context_tokens=512,
    tokens_per_image=16,
    max_token_chars=13,
)


def _uri(fmt: str, media: str = "image/png") -> str:
    buf = io.BytesIO()
    Image.new("RGBA" if fmt == "PNG" else "RGB", (9, 7), (200, 30, 30, 128)).save(buf, fmt)
    return f"data:{media};base64," + base64.b64encode(buf.getvalue()).decode()


BIG_INTS = [
    0,
    1,
    -1,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64 - 1,
    2**64,
    10**400,
    -(10**400),
]
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 5e-324, 1e-300, 1e-6, 0.01, 0.5, 1.0, 2.0, 2.0000001, 10.0, 1e308, float("inf"), float("nan")]
)
INTS = st.integers(min_value=-(10**400), max_value=10**400) | st.sampled_from(BIG_INTS)
# any character, lone surrogates included (JSON can carry them as \\udXXX escapes)
TEXT = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["", MARKER, "<ima", "ge>", "<|im_end|>", "<|im_start|>assistant\n", "\x00", "好" * 40]
)
SCALARS = st.none() | st.booleans() | INTS | FLOATS | TEXT
JSON = st.recursive(
    SCALARS, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3), max_leaves=8
)
URLS = (
    st.sampled_from(
        [
            _uri("PNG"),
            _uri("JPEG", "image/png"),
            _uri("GIF"),
            _uri("WEBP"),
            _uri("BMP"),
            _uri("TIFF"),
            _uri("PNG", "text/plain"),
            "data:image/png;base64,",
            "data:image/png;base64,!!!",
            "data:image/png,abc",
            "data:image/png;base64,iVBORw0KGgo=",
            "https://example.com/a.png",
            "file:///etc/passwd",
            "/etc/passwd",
            "",
            "data:",
            "DATA:IMAGE/PNG;BASE64,AAAA",
        ]
    )
    | JSON
)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT | JSON}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": URLS}) | URLS}
    ),
    st.dictionaries(st.sampled_from(["type", "text", "image_url"]), JSON, max_size=3),
    JSON,
)
ROLE = st.sampled_from(["user", "user", "system", "developer", "assistant", "tool", "User", ""]) | JSON
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": TEXT | st.lists(PART, max_size=4) | JSON}) | JSON
FIELDS = {
    "max_tokens": INTS | FLOATS | JSON,
    "max_completion_tokens": INTS | JSON,
    "temperature": FLOATS | INTS | JSON,
    "top_p": FLOATS | INTS | JSON,
    "top_k": INTS | FLOATS | JSON,
    "repetition_penalty": FLOATS | INTS | JSON,
    "seed": INTS | FLOATS | JSON,
    "stop": TEXT | st.lists(TEXT, max_size=20) | st.just(["x" * 600]) | JSON,
    "stream": st.booleans() | JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | JSON}) | JSON,
    "n": INTS | JSON,
    "presence_penalty": FLOATS | JSON,
    "frequency_penalty": FLOATS | JSON,
    "tools": JSON,
    "tool_choice": JSON,
    "logprobs": JSON,
    "response_format": JSON,
    "functions": JSON,
    "ignore_eos": st.booleans() | JSON,
    "user": JSON,
}


@st.composite
def bodies(draw) -> bytes:
    """A request body: mostly a well-formed core (hypothesis favours the first choices), each
    field sometimes of another type or out of range, sometimes not JSON at all."""
    kind = draw(st.integers(0, 19))
    if kind == 19:
        return draw(st.binary(max_size=64))
    if kind == 18:
        return json.dumps(draw(JSON)).encode()
    body: dict = {}
    if draw(st.integers(0, 9)) < 9:
        body["model"] = MODEL_NAME if draw(st.integers(0, 5)) < 5 else draw(TEXT | JSON)
    if draw(st.integers(0, 9)) < 9:
        last = st.fixed_dictionaries({"role": st.just("user"), "content": TEXT | st.lists(PART, max_size=4)})
        history = draw(st.lists(MESSAGE, max_size=2))
        body["messages"] = (
            [*history, draw(last if draw(st.integers(0, 4)) < 4 else MESSAGE)]
            if draw(st.integers(0, 9)) < 9
            else draw(JSON)
        )
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=5, unique=True)):
        body[name] = draw(FIELDS[name])
    text = json.dumps(
        body
    )  # NaN / Infinity literals and \udXXX escapes included, as JSON parsers accept them
    if draw(st.integers(0, 19)) == 19:
        text = text[: draw(st.integers(0, len(text)))]  # truncated
    return text.encode()


SLOW_CI = [HealthCheck.too_slow, HealthCheck.data_too_large]  # a busy 2-core CI box is no reason to fail


@settings(max_examples=800, deadline=None, database=None, suppress_health_check=SLOW_CI)
@given(raw=bodies())
def test_the_validator_answers_every_body_with_a_request_or_a_4xx(raw):
    try:
        req = parse_chat_request(raw, MARKER, LIMITS)
    except APIError as e:
        assert 400 <= e.status < 500 and e.body()["error"]["message"]
        json.dumps(e.body())  # the error itself can always be sent
        return
    assert isinstance(req, ChatRequest) and req.messages[-1]["role"] == "user"
    assert 1 <= req.params.max_new_tokens <= LIMITS.max_tokens and 0.0 <= req.params.temperature <= 2.0
    assert sum(m["content"].count(MARKER) for m in req.messages) == len(req.images)


@pytest.fixture(scope="module")
def fuzz_server(serve_model):
    limits = Limits(max_tokens=4, default_max_tokens=2, max_images=4)
    with make_server(serve_model, limits=limits, max_body_bytes=1 << 20) as server:
        yield server


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[*SLOW_CI, HealthCheck.function_scoped_fixture],
)
@given(raw=bodies())
def test_the_server_answers_every_body_with_a_success_or_an_openai_4xx(fuzz_server, raw):
    r = httpx.post(
        f"{fuzz_server.url}/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
    else:
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
