"""Helpers shared by the inference and serving tests (fixtures live in the conftest files)."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import torch
from PIL import Image

from seechat.model import build
from seechat.model.checkpoint import write_checkpoint
from tests.helpers import model_config


def write_tiny_checkpoint(experts, directory: Path, lm: str = "qwen2", bridge: str = "mlp2x_gelu") -> Path:
    """A tiny random seechat checkpoint (CLIP vision, 16 tokens per image) saved like a real one."""
    torch.manual_seed(0)
    model, processor = build(model_config(experts, "clip", lm, bridge))
    write_checkpoint(model, processor, directory)
    return directory


COLOURS = (
    (255, 0, 0),
    (0, 0, 255),
    (0, 200, 0),
    (240, 200, 0),
    (120, 0, 160),
    (0, 0, 0),
    (255, 255, 255),
    (90, 90, 90),
)


def coloured(i: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, COLOURS[i % len(COLOURS)])


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def generate_concurrently(engine, requests: list[tuple]) -> list[list[int] | None]:
    """Each (input_ids, images, params) request on its own thread, all at once, so that they share
    the engine's decode steps (prefix cache off); each one's token ids, in request order."""
    results: list[list[int] | None] = [None] * len(requests)

    def run(j: int) -> None:
        ids, images, params = requests[j]
        results[j] = engine.generate(ids, images, params, cache_prefix=False).token_ids

    threads = [threading.Thread(target=run, args=(j,)) for j in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
