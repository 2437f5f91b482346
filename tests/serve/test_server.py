"""The HTTP API with real clients on loopback: the official openai client (plain, streaming, with
images), every kind of bad input, API keys, a full queue, and 64 concurrent streaming clients."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx
import openai
import pytest

from seechat.infer.chat import prompt_ids
from seechat.infer.engine import EngineConfig
from seechat.infer.generate import generate
from seechat.infer.sampling import SamplingParams
from seechat.model.checkpoint import write_checkpoint
from tests.infer.tiny_engine import coloured, data_uri
from tests.serve.conftest import MODEL_NAME, make_server, start_serve


def image_msg(text: str, *indices: int) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(coloured(i))}} for i in indices]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def client(server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def expected(serve_model, messages: list[dict], images: list, max_tokens: int) -> str:
    """The engine-independent reference: the plain generator on the same prompt."""
    model, processor = serve_model
    ids = prompt_ids(processor, messages, len(images))
    pixels = processor.preprocess_images(images)
    new = generate(
        model, ids[None], None, pixels, SamplingParams(max_new_tokens=max_tokens), processor.stop_token_ids
    )[0]
    return processor.decode(new)


def test_openai_client_plain_and_streaming_with_an_image(live, serve_model):
    c = client(live)
    assert [m.id for m in c.models.list().data] == [MODEL_NAME]
    msgs = [image_msg("图里有什么？", 0)]
    plain = c.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=10)
    want = expected(serve_model, [{"role": "user", "content": "<image>\n图里有什么？"}], [coloured(0)], 10)
    assert plain.choices[0].message.content == want and plain.choices[0].message.role == "assistant"
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.object == "chat.completion"
    assert (
        plain.usage.prompt_tokens > 16
        and plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    )

    stream = c.chat.completions.create(
        model=MODEL_NAME, messages=msgs, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    pieces, finish, use = [], None, None
    for chunk in stream:
        if chunk.usage:
            use = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == want and len([p for p in pieces if p]) > 1  # it arrived in pieces
    assert finish == plain.choices[0].finish_reason and use.completion_tokens == plain.usage.completion_tokens

    # a second turn re-sends the history; the server reuses the first turn's KV
    turn2 = c.chat.completions.create(
        model=MODEL_NAME,
        max_tokens=6,
        messages=[*msgs, {"role": "assistant", "content": want}, {"role": "user", "content": "是什么颜色？"}],
    )
    assert turn2.usage.prompt_tokens_details.cached_tokens >= plain.usage.prompt_tokens


def test_health_page_and_static_files(live):
    health = httpx.get(f"{live.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME and "running" in health["engine"]
    page = httpx.get(f"{live.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="file-input"' in page.text and "/static/app.js" in page.text
    assert "parseBoxes" in httpx.get(f"{live.url}/static/app.js").text


def _post(server, payload, **kw) -> httpx.Response:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **kw.pop("headers", {})},
        timeout=60,
        **kw,
    )


BAD = {
    "malformed json": (b'{"model": ', 400, "invalid_json"),
    "missing messages": ({"model": MODEL_NAME}, 400, "missing_field"),
    "wrong field type": (
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"},
        400,
        "invalid_type",
    ),
    "unknown role": (
        {"model": MODEL_NAME, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "invalid_role",
    ),
    "corrupt image": (
        {
            "model": MODEL_NAME,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAA="}}
                    ],
                }
            ],
        },
        400,
        "invalid_image",
    ),
    "non-image data uri": (
        {
            "model": MODEL_NAME,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:application/pdf;base64,JVBERi0="}}
                    ],
                }
            ],
        },
        400,
        "invalid_image",
    ),
    "http image url": (
        {
            "model": MODEL_NAME,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}],
                }
            ],
        },
        400,
        "image_url_not_allowed",
    ),
    "file url": (
        {
            "model": MODEL_NAME,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}],
                }
            ],
        },
        400,
        "image_url_not_allowed",
    ),
    "unknown model": (
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
        404,
        "model_not_found",
    ),
    "too many tokens": (
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "你好" * 400}]},
        400,
        "context_length_exceeded",
    ),
    "too many images": (
        {"model": MODEL_NAME, "messages": [image_msg("x", *range(33))]},
        400,
        "context_length_exceeded",
    ),
    "max_tokens beyond context": (
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 500},
        400,
        "context_length_exceeded",
    ),
    "body too large": (b"{" + b" " * (3 << 20) + b"}", 413, "request_too_large"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_an_openai_error_and_the_server_stays_up(live, name):
    payload, status, code = BAD[name]
    r = _post(live, payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    ok = _post(
        live, {"model": MODEL_NAME, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}
    )
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_openai_client_sees_clear_errors(live):
    c = client(live)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="no server-side fetching"):
        c.chat.completions.create(
            model=MODEL_NAME,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
                }
            ],
        )
    r = httpx.get(f"{live.url}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(f"{live.url}/v1/chat/completions").status_code == 405


def test_api_key(serve_model):
    with make_server(serve_model, api_key="s3cret") as server:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = _post(
                server, {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}]}, headers=headers
            )
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200  # liveness stays open
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        out = client(server, "s3cret").chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2
        )
        assert out.usage.completion_tokens >= 1


def test_full_queue_is_429_and_a_disconnect_frees_the_slot(serve_model):
    long = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "你好"}],
        "max_tokens": 480,
        "ignore_eos": True,
    }
    with make_server(serve_model, EngineConfig(max_batch_size=1, max_waiting=1)) as server:
        # one runs, one waits, the rest find the queue full
        results: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: results.append(_post(server, long))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) == {200, 429}, codes
        busy = next(r for r in results if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"

        # a client that hangs up mid-stream: its request is cancelled at once, not run to the end
        with httpx.Client(timeout=60) as http:
            with http.stream(
                "POST", f"{server.url}/v1/chat/completions", json={**long, "stream": True}
            ) as first:
                assert first.status_code == 200
                next(first.iter_lines())
        deadline = time.monotonic() + 10
        while (stats := httpx.get(f"{server.url}/health").json()["engine"])[
            "running"
        ] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stats["running"] == 0 and stats["aborted"] == 1


def test_64_concurrent_streaming_clients(live, serve_model):
    prompts = [
        [image_msg("图里有什么？", k)] if k % 2 == 0 else [{"role": "user", "content": "你好" * (1 + k)}]
        for k in range(8)
    ]
    c = client(live)
    alone = [
        c.chat.completions.create(model=MODEL_NAME, messages=m, max_tokens=8).choices[0].message.content
        for m in prompts
    ]
    before = httpx.get(f"{live.url}/health").json()["engine"]["decode_steps"]

    async def one(ac: openai.AsyncOpenAI, k: int) -> str:
        stream = await ac.chat.completions.create(
            model=MODEL_NAME, messages=prompts[k % 8], max_tokens=8, stream=True
        )
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def all_clients() -> list:
        async with openai.AsyncOpenAI(
            base_url=f"{live.url}/v1",
            api_key="none",
            max_retries=0,
            timeout=120,
            http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=100)),
        ) as ac:
            return await asyncio.gather(*(one(ac, k) for k in range(64)), return_exceptions=True)

    results = asyncio.run(all_clients())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert [r == alone[k % 8] for k, r in enumerate(results)] == [True] * 64
    stats = httpx.get(f"{live.url}/health").json()["engine"]
    assert stats["max_running"] > 8  # decoded together, not one after another
    assert stats["decode_steps"] - before < 64 * 8 / 4


def test_serve_verb_binds_loopback_and_reads_the_key_from_the_environment(serve_model, tmp_path):
    model, processor = serve_model
    write_checkpoint(model, processor, tmp_path / "ckpt")
    env = {**os.environ, "SEECHAT_API_KEY": "from-env"}
    proc, _, url = start_serve(["--model", str(tmp_path / "ckpt"), "--log-level", "warning"], env, timeout=60)
    try:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer from-env"}).json()
        assert models["data"][0]["id"] == "ckpt"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "http://127.0.0.1:" in out and "API key required" in out
