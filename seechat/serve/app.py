"""`seechat serve`: an OpenAI-compatible HTTP API and a browser chat page over the engine.

    POST /v1/chat/completions   OpenAI chat completions: text and image_url (data: URI) parts,
                                `stream: true` as server-sent events, usage counts
    GET  /v1/models             the one model this server serves
    GET  /health                liveness: 200 {"status": "ok"} only while the engine's scheduler
                                thread runs, else 503; the model name and engine counters only
                                for callers with a valid key (or when the server has no key)
    GET  /                      the chat page (static/index.html): upload or paste an image, chat,
                                the reply streams in, <box>...</box> in a reply is drawn on the image

The layer is thin: `seechat.serve.protocol` validates requests and shapes responses,
`seechat.infer.chat.prompt_ids` renders the conversation, `seechat.infer.engine.Engine` does the
rest (batching, caches, streaming). What it promises, and how (docs/serving.md lists the limits
and their flags):

- one client's request never fails or stalls another's: a bad request is refused before it
  reaches the engine, and the engine fails a broken row alone;
- memory stays bounded whatever clients send: the body is counted while it streams in, images are
  checked on their headers, then decoded a bounded number at a time and kept only as the vision
  tower's pixel values; the waiting queue is bounded in requests and in bytes, the running batch
  by a KV token budget;
- every bad request gets an OpenAI-shaped 4xx, and an unexpected failure an OpenAI-shaped 500,
  never a plain-text one;
- a web page cannot drive it: the Host header must name this server (DNS rebinding) and the body
  must be declared application/json (a cross-site form or `fetch` without CORS cannot do that);
- prefix reuse and image features are shared only between requests with the same API key.

It binds 127.0.0.1 unless told otherwise; with API keys (`--api-key`, repeatable, or
`SEECHAT_API_KEY`, comma-separated) every /v1 request needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from seechat.data.images import ImageError, load_image
from seechat.data.processor import SeeChatProcessor
from seechat.infer.chat import prompt_ids
from seechat.infer.engine import Engine, EngineClosedError, QueueFullError, RequestError
from seechat.serve.protocol import (
    APIError,
    ChatRequest,
    Limits,
    chunk_body,
    completion_body,
    new_id,
    parse_chat_request,
    sse,
    usage,
)

STATIC = Path(__file__).parent / "static"
API_KEY_ENV = "SEECHAT_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ANY_HOST = "*"
log = logging.getLogger(__name__)


def host_name(header: str) -> str:
    """The host part of a Host header: 'a.b:80' -> 'a.b', '[::1]:80' -> '::1' (lower case)."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class HostCheck:
    """ASGI middleware: refuse any request whose Host header is not an allowed name (a page on
    another site that rebinds its DNS name to this address still sends its own name). 421."""

    def __init__(self, app, allowed: Sequence[str]):
        self.app = app
        self.allowed = frozenset(h.lower().strip("[]") for h in allowed)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and ANY_HOST not in self.allowed:
            host = host_name(Headers(scope=scope).get("host", ""))
            if host.rstrip(".") not in self.allowed:
                err = APIError(
                    421,
                    f"this server does not answer for host {host[:100]!r}; "
                    f"allowed: {', '.join(sorted(self.allowed))} "
                    "(start it with --allowed-hosts to add names)",
                    code="invalid_host",
                )
                await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def key_scope(key: str) -> str:
    """The cache scope of an API key: a digest, so the key itself is never kept in cache entries."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def create_app(
    engine: Engine,
    processor: SeeChatProcessor,
    model_name: str,
    api_key: str | Sequence[str] | None = None,
    limits: Limits = Limits(),
    max_body_bytes: int = 32 << 20,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    image_decoders: int = 2,
    body_timeout_s: float = 60.0,
) -> FastAPI:
    """`api_key`: one key or several (each its own cache scope); None or empty: no key.
    `allowed_hosts`: names the Host header may carry ("*": any). `image_decoders`: images decoded
    at once across all requests (each holds one full-size decoded image at a time)."""
    keys = tuple(k for k in ([api_key] if isinstance(api_key, str) else api_key or ()) if k)
    tokenizer = processor.tokenizer
    limits = dataclasses.replace(
        limits,
        context_tokens=limits.context_tokens or engine.max_model_len,
        tokens_per_image=limits.tokens_per_image or engine.model.num_image_tokens,
        max_token_chars=limits.max_token_chars or max(map(len, tokenizer.get_vocab())),
    )
    decoding = asyncio.Semaphore(max(1, image_decoders))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="seechat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HostCheck, allowed=allowed_hosts)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        err = APIError(
            e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=str(e.status_code)
        )
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        err = APIError(
            500, f"internal server error ({type(e).__name__})", type="server_error", code="internal_error"
        )
        return JSONResponse(err.body(), status_code=500)

    def scope_of(request: Request) -> str | None:
        """The caller's cache scope: "" on a keyless server, a key's digest for a valid key, else None."""
        if not keys:
            return ""
        given = request.headers.get("authorization", "")
        token = (given[7:].strip() if given[:7].lower() == "bearer " else "").encode()
        match = None
        for k in keys:  # compare with every key: the time taken does not say which one matched
            if hmac.compare_digest(token, k.encode()):
                match = k
        return None if match is None else key_scope(match)

    def check_key(request: Request) -> str:
        scope = scope_of(request)
        if scope is None:
            raise APIError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return scope

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        alive = engine.alive
        body: dict = {"status": "ok" if alive else "unavailable"}
        if scope_of(request) is not None:  # details only for those who may use the API
            body |= {"model": model_name, "engine": engine.stats()}
        return JSONResponse(body, status_code=200 if alive else 503)

    def model_card() -> dict:
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "seechat",
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        check_key(request)
        if model_id != model_name:
            raise APIError(
                404,
                f"model {model_id!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        return model_card()

    def prepare_images(req: ChatRequest) -> torch.Tensor | None:
        """Decode each image (EXIF, alpha on white, RGB) and keep only its pixel values for the
        vision tower: a full-size decoded image lives only while it is being preprocessed."""
        pixels = []
        for i, data in enumerate(req.images):
            try:
                image = load_image(data, limits.max_image_pixels)
            except ImageError as e:
                raise APIError(400, f"image {i + 1}: {e}", param="messages", code="invalid_image") from None
            pixels.append(processor.preprocess_images([image]))
            del image
        return torch.cat(pixels) if pixels else None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        scope = check_key(request)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise APIError(
                415,
                f"the request body must be sent as 'Content-Type: application/json' (got "
                f"{media[:60] or 'none'!r})",
                code="unsupported_media_type",
            )
        raw = await read_body(request, max_body_bytes, body_timeout_s)
        req = await run_in_threadpool(parse_chat_request, raw, processor.image_token, limits)
        del raw
        if req.model != model_name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        try:
            ids = await run_in_threadpool(prompt_ids, processor, req.messages, len(req.images))
        except ValueError as e:
            raise APIError(
                400, f"the conversation cannot be rendered: {e}", param="messages", code="invalid_value"
            ) from None
        n, ctx = int(ids.numel()), engine.max_model_len
        if n >= ctx or (req.max_tokens_given and n + req.params.max_new_tokens > ctx):
            asked = (
                f" + {req.params.max_new_tokens} requested completion tokens" if req.max_tokens_given else ""
            )
            raise APIError(
                400,
                f"this model's context is {ctx} tokens, but the messages are {n} tokens "
                f"({len(req.images)} image(s) x {engine.model.num_image_tokens} tokens included){asked}; "
                "send fewer images or a shorter conversation",
                param="messages",
                code="context_length_exceeded",
            )
        async with decoding:
            pixels = await run_in_threadpool(prepare_images, req)
        req.images = []
        loop = asyncio.get_running_loop()
        try:
            events = await run_in_threadpool(
                engine.astream,
                ids,
                () if pixels is None else pixels,
                req.params,
                req.stop,
                True,
                loop,
                req.ignore_eos,
                scope,
            )
        except QueueFullError as e:
            raise APIError(
                429,
                f"the server is busy: {e}",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except EngineClosedError as e:
            raise APIError(503, str(e), type="server_error", code="unavailable") from None
        except RequestError as e:
            raise APIError(400, str(e), param="messages", code="invalid_request") from None
        del pixels
        cid = new_id()
        if req.stream:
            return StreamingResponse(
                _stream(events, cid, model_name, req.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        watcher = asyncio.create_task(_cancel_on_disconnect(request, events))
        parts, last = [], None
        try:
            async for ev in events:
                parts.append(ev.text)
                last = ev
        finally:
            watcher.cancel()
            events.cancel()
        _raise_for_finish(last)
        use = usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
        return JSONResponse(completion_body(cid, model_name, "".join(parts), last.finish_reason, use))

    return app


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, counted while it streams in (a chunked upload has no Content-Length to
    check first): 413 as soon as it passes `limit`, 408 when it takes longer than `timeout_s`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(
            413,
            f"the request body is {int(declared):,} bytes; the limit is {limit:,}",
            code="request_too_large",
        )
    chunks: list[bytes] = []

    async def receive() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(
                    413,
                    f"the request body is more than {limit:,} bytes (the limit)",
                    code="request_too_large",
                )
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), timeout_s)
    except TimeoutError:
        raise APIError(
            408, f"the request body did not arrive within {timeout_s:g} s", code="timeout"
        ) from None
    except ClientDisconnect:
        raise APIError(
            400, "the client disconnected while sending the body", code="client_disconnected"
        ) from None
    return b"".join(chunks)


async def _cancel_on_disconnect(request: Request, events) -> None:
    """Wait for the client to go away (the body has been read: the next ASGI message is the
    disconnect) and cancel its request, so a non-streaming request stops generating too."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            events.cancel()
            return


def _raise_for_finish(ev) -> None:
    if ev.finish_reason == "error":
        raise APIError(500, f"generation failed: {ev.error}", type="server_error", code="generation_failed")
    if ev.finish_reason == "timeout":
        raise APIError(504, "the request timed out in the server", type="server_error", code="timeout")
    if ev.finish_reason == "abort":
        raise APIError(503, ev.error or "the request was aborted", type="server_error", code="aborted")


async def _stream(events, cid: str, model_name: str, include_usage: bool):
    try:
        yield sse(chunk_body(cid, model_name, {"role": "assistant", "content": ""}))
        async for ev in events:
            if ev.text:
                yield sse(chunk_body(cid, model_name, {"content": ev.text}))
            if ev.finish_reason is None:
                continue
            try:
                _raise_for_finish(ev)
            except APIError as e:
                yield sse(e.body())
                break
            yield sse(chunk_body(cid, model_name, {}, ev.finish_reason))
            if include_usage:
                use = usage(ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens)
                yield sse(chunk_body(cid, model_name, {}, use=use, choices=False))
        yield sse("[DONE]")
    finally:
        events.cancel()


def default_allowed_hosts(bind: str) -> tuple[str, ...]:
    """Host names to accept when --allowed-hosts is not given (see `HostCheck`)."""
    if bind in LOOPBACK_HOSTS:
        return LOOPBACK_HOSTS
    if bind in ("0.0.0.0", "::", ""):
        return (ANY_HOST,)  # reachable under names we cannot know; say them with --allowed-hosts
    return (bind,)
