"""`seechat serve`: an OpenAI-compatible HTTP API and a browser chat page over the engine.

    POST /v1/chat/completions   OpenAI chat completions: text and image_url (data: URI) parts,
                                `stream: true` as server-sent events, usage counts
    GET  /v1/models             the one model this server serves
    GET  /health                liveness plus engine counters
    GET  /                      the chat page (static/index.html): upload or paste an image, chat,
                                the reply streams in, <box>...</box> in a reply is drawn on the image

The layer is thin: `seechat.serve.protocol` validates requests and shapes responses,
`seechat.infer.session.prompt_ids` renders the conversation, `seechat.infer.engine.Engine` does the
rest (batching, caches, streaming). Bad input gets an OpenAI-shaped 4xx and the server stays up;
a full admission queue gives 429, too many open connections 503 (uvicorn's `limit_concurrency`).
It binds 127.0.0.1 unless told otherwise; with an API key (`--api-key` or `SEECHAT_API_KEY`)
every /v1 request needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from seechat.data.processor import SeeChatProcessor
from seechat.infer.engine import Engine, EngineClosedError, EngineConfig, QueueFullError, RequestError
from seechat.infer.session import prompt_ids
from seechat.serve.protocol import (
    APIError,
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
log = logging.getLogger(__name__)


def create_app(
    engine: Engine,
    processor: SeeChatProcessor,
    model_name: str,
    api_key: str | None = None,
    limits: Limits = Limits(),
    max_body_bytes: int = 32 << 20,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="seechat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        err = APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=str(e.status_code))
        return JSONResponse(err.body(), status_code=e.status_code)

    def check_key(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "engine": engine.stats()}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "seechat",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        check_key(request)
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"the request body is {int(declared):,} bytes; the limit is {max_body_bytes:,}",
                           code="request_too_large")
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"the request body is {len(raw):,} bytes; the limit is {max_body_bytes:,}",
                           code="request_too_large")
        req = await run_in_threadpool(parse_chat_request, raw, processor.image_token, limits)
        if req.model != model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        ids = await run_in_threadpool(prompt_ids, processor, req.messages, len(req.images))
        n, ctx = int(ids.numel()), engine.max_model_len
        if n >= ctx or (req.max_tokens_given and n + req.params.max_new_tokens > ctx):
            asked = f" + {req.params.max_new_tokens} requested completion tokens" if req.max_tokens_given else ""
            raise APIError(
                400, f"this model's context is {ctx} tokens, but the messages are {n} tokens "
                f"({len(req.images)} image(s) x {engine.model.num_image_tokens} tokens included){asked}; "
                "send fewer images or a shorter conversation", param="messages", code="context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        try:
            events = await run_in_threadpool(
                engine.astream, ids, req.images, req.params, req.stop, True, loop, req.ignore_eos
            )
        except QueueFullError as e:
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineClosedError as e:
            raise APIError(503, str(e), type="server_error", code="unavailable") from None
        except RequestError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        cid = new_id()
        if req.stream:
            return StreamingResponse(
                _stream(events, cid, model_name, req.include_usage), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        parts, last = [], None
        try:
            async for ev in events:
                parts.append(ev.text)
                last = ev
        finally:
            events.cancel()
        _raise_for_finish(last)
        use = usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
        return JSONResponse(completion_body(cid, model_name, "".join(parts), last.finish_reason, use))

    return app


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


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a seechat checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default="", help="the id clients send as 'model' (default: the folder name)")
    parser.add_argument("--api-key", default="", help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    parser.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, cuda:1 ...)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together")
    parser.add_argument("--max-waiting", type=int, default=256, help="queued requests before answering 429")
    parser.add_argument("--max-connections", type=int, default=1024, help="open connections before answering 503")
    parser.add_argument("--max-model-len", type=int, default=0, help="context tokens (0 = the LM's own limit)")
    parser.add_argument("--max-images", type=int, default=8, help="images per request")
    parser.add_argument("--max-image-pixels", type=int, default=Limits().max_image_pixels,
                        help="refuse images with more pixels than this (decompression bombs)")
    parser.add_argument("--max-tokens", type=int, default=512, help="completion tokens when a request does not say")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="temperature when a request does not say (default 0: greedy)")
    parser.add_argument("--prefix-cache-mb", type=int, default=256, help="KV prefix cache size (0 = off)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--no-fast-decode", action="store_true", help="decode with the transformers forward only")
    parser.add_argument("--log-level", default="info")


def run_from_args(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from seechat.model import load

    if args.threads:
        torch.set_num_threads(args.threads)
    api_key = args.api_key or os.environ.get(API_KEY_ENV, "")
    model, processor = load(args.model, device=args.device)
    name = args.model_name or Path(args.model).resolve().name
    engine = Engine(model, processor, EngineConfig(
        max_batch_size=args.max_batch_size, max_waiting=args.max_waiting, max_model_len=args.max_model_len,
        max_images_per_request=args.max_images, prefix_cache_mb=args.prefix_cache_mb,
        request_timeout_s=args.request_timeout, fast_decode="off" if args.no_fast_decode else "auto",
    ))
    limits = Limits(max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                    max_tokens=engine.max_model_len, default_max_tokens=args.max_tokens,
                    default_temperature=args.temperature)
    app = create_app(engine, processor, name, api_key or None, limits)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: binding {args.host} without an API key: anyone who can reach this port can use the model")
    print(f"seechat serve: model {name!r} ({engine.runner.decode_path} decode) on http://{args.host}:{args.port}/ "
          f"(API: /v1/chat/completions{', API key required' if api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                limit_concurrency=args.max_connections, timeout_keep_alive=30)
    return 0
