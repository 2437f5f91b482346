"""`seechat serve --model DIR`: the OpenAI-compatible API and chat page (seechat.serve.app).

Parses the options into an `EngineConfig`, `Limits` and `create_app` arguments, warns about an
open bind without an API key, and runs uvicorn. The API itself, its errors and limits:
docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from seechat.infer.engine import EngineConfig
from seechat.serve.app import API_KEY_ENV
from seechat.serve.protocol import Limits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    e, lim = EngineConfig(), Limits()
    parser.add_argument("--model", required=True, help="a seechat checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--allowed-hosts",
        default="",
        help="comma-separated names the Host header may carry, '*' for any (default: the loopback "
        "names for a loopback bind, the address itself for another address, any for 0.0.0.0 / ::)",
    )
    parser.add_argument(
        "--model-name", default="", help="the id clients send as 'model' (default: the folder name)"
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help=f"require 'Authorization: Bearer KEY'; repeat for several keys, each its own cache "
        f"scope (or set {API_KEY_ENV}, comma-separated)",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda, cuda:1 ...)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument(
        "--max-batch-size", type=int, default=e.max_batch_size, help="requests decoded together"
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=e.max_batch_tokens,
        help="KV tokens the running batch may hold, padding included (at least --max-model-len)",
    )
    parser.add_argument(
        "--max-waiting", type=int, default=e.max_waiting, help="queued requests before answering 429"
    )
    parser.add_argument(
        "--max-waiting-mb",
        type=int,
        default=e.max_waiting_bytes >> 20,
        help="MB the queued requests may hold (image pixels, token ids) before answering 429",
    )
    parser.add_argument(
        "--max-connections", type=int, default=1024, help="open connections before answering 503"
    )
    parser.add_argument(
        "--max-model-len", type=int, default=0, help="context tokens (0 = the LM's own limit)"
    )
    parser.add_argument("--max-body-mb", type=int, default=32, help="request body size limit (413 beyond)")
    parser.add_argument(
        "--body-timeout", type=float, default=60.0, help="seconds to receive a request body (408 beyond)"
    )
    parser.add_argument("--max-images", type=int, default=lim.max_images, help="images per request")
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=lim.max_image_pixels,
        help="refuse images with more pixels than this (decompression bombs)",
    )
    parser.add_argument(
        "--max-image-aspect",
        type=float,
        default=lim.max_image_aspect,
        help="refuse images whose long side is more than this many times the short side",
    )
    parser.add_argument(
        "--image-decoders",
        type=int,
        default=2,
        help="images decoded at once across all requests (each holds one full-size image)",
    )
    parser.add_argument(
        "--max-stop-chars",
        type=int,
        default=lim.max_stop_chars,
        help="total length of a request's stop strings",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=512, help="completion tokens when a request does not say"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="temperature when a request does not say (default 0: greedy)",
    )
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=256,
        help="KV prefix cache size (0 = off); reuse is scoped per API key",
    )
    parser.add_argument(
        "--speculative-tokens",
        type=int,
        default=e.speculative_tokens,
        help="n-gram drafts per verify step for a lone request (greedy, or sampled without a seed), "
        "used only while they pay (0 = no speculative decoding; outputs are the same either way: "
        "greedy tokens, or sampling's distribution)",
    )
    parser.add_argument(
        "--draft-history-tokens",
        type=int,
        default=e.draft_history_tokens,
        help="tokens of earlier replies that drafts are also looked up in, kept per API key "
        "(0 = drafts from the request only)",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=e.request_timeout_s, help="seconds per request"
    )
    parser.add_argument(
        "--no-fast-decode",
        action="store_true",
        help="decode with the transformers forward only (no fast CPU step, no CUDA graphs)",
    )
    parser.add_argument(
        "--compile-decode",
        action="store_true",
        help="run the static (GPU) decode step's layers through torch.compile inside its CUDA graphs; "
        "compiles at start, in the warm-up (not yet measured to help: off by default)",
    )
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from seechat.infer.engine import Engine
    from seechat.model import load
    from seechat.serve.app import LOOPBACK_HOSTS, create_app, default_allowed_hosts

    if args.threads:
        torch.set_num_threads(args.threads)
    keys = [k for k in args.api_key if k] or [
        k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()
    ]
    hosts = tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()) or default_allowed_hosts(
        args.host
    )
    model, processor = load(args.model, device=args.device)
    name = args.model_name or Path(args.model).resolve().name
    engine = Engine(
        model,
        processor,
        EngineConfig(
            max_batch_size=args.max_batch_size,
            max_batch_tokens=args.max_batch_tokens,
            max_waiting=args.max_waiting,
            max_waiting_bytes=args.max_waiting_mb << 20,
            max_model_len=args.max_model_len,
            max_images_per_request=args.max_images,
            prefix_cache_mb=args.prefix_cache_mb,
            request_timeout_s=args.request_timeout,
            speculative_tokens=args.speculative_tokens,
            draft_history_tokens=args.draft_history_tokens,
            fast_decode="off" if args.no_fast_decode else "auto",
            static_decode="off" if args.no_fast_decode else "auto",
            compile_decode=args.compile_decode,
        ),
    )
    limits = Limits(
        max_image_pixels=args.max_image_pixels,
        max_image_aspect=args.max_image_aspect,
        max_images=args.max_images,
        max_tokens=engine.max_model_len,
        default_max_tokens=args.max_tokens,
        default_temperature=args.temperature,
        max_stop_chars=args.max_stop_chars,
    )
    app = create_app(
        engine,
        processor,
        name,
        keys,
        limits,
        max_body_bytes=args.max_body_mb << 20,
        allowed_hosts=hosts,
        image_decoders=args.image_decoders,
        body_timeout_s=args.body_timeout,
    )
    try:  # before serving: on a GPU the warm-up allocates the KV pool and captures the graphs
        engine.start()
    except RuntimeError as e:  # a KV pool too large for the device says which flags size it
        print(f"seechat serve: {e}", file=sys.stderr)
        return 1
    if engine.warm_up_report:
        print(f"seechat serve: {engine.warm_up_report}", flush=True)
    if args.host not in LOOPBACK_HOSTS and not keys:
        print(
            f"warning: binding {args.host} without an API key: "
            "anyone who can reach this port can use the model"
        )
    print(
        f"seechat serve: model {name!r} ({engine.runner.decode_path} decode) "
        f"on http://{args.host}:{args.port}/ "
        f"(API: /v1/chat/completions{', API key required' if keys else ''}; hosts: {', '.join(hosts)})",
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        limit_concurrency=args.max_connections,
        timeout_keep_alive=30,
    )
    return 0
