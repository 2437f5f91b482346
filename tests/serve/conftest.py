"""Fixtures for seechat.serve tests: a tiny checkpoint and live servers on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn

from seechat.infer.engine import Engine, EngineConfig
from seechat.model import load
from seechat.serve.app import create_app
from seechat.serve.protocol import Limits
from tests.infer.tiny_engine import write_tiny_checkpoint

MODEL_NAME = "tiny-seechat"


class LiveServer:
    """A real uvicorn server for `app` on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, app, **uvicorn_kw):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **uvicorn_kw)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def serve_model(experts, tmp_path_factory):
    ckpt = write_tiny_checkpoint(experts, tmp_path_factory.mktemp("serve_ckpt") / "ckpt")
    return load(ckpt)


def make_server(
    serve_model,
    engine_config: EngineConfig = EngineConfig(),
    limits: Limits = Limits(max_images=64),
    **app_kw,
) -> LiveServer:
    model, processor = serve_model
    engine = Engine(model, processor, engine_config)
    server = LiveServer(create_app(engine, processor, MODEL_NAME, limits=limits, **app_kw))
    server.engine = engine  # for tests that look inside
    return server


def start_serve(args: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.Popen, int, str]:
    """`seechat serve ARGS` in its own process on a free loopback port, once /health answers 200:
    (process, port, base URL). The caller terminates it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "seechat.cli", "serve", "--port", str(port), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, port, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() >= deadline:
            proc.kill()
            raise AssertionError(
                "seechat serve did not come up: " + (proc.communicate(timeout=30)[0] or "")[-2000:]
            )
        time.sleep(0.1)


@pytest.fixture(scope="module")
def live(serve_model):
    """The shared server: batch 32, queue 256, 64 images per request, 2 MB bodies."""
    with make_server(serve_model, EngineConfig(max_batch_size=32), max_body_bytes=2 << 20) as server:
        yield server
