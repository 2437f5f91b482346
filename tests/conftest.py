"""Shared fixtures: tiny random experts of every supported architecture, built once per session."""

from __future__ import annotations

import os

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from seechat.model.tiny import LM_ARCHS, VISION_ARCHS, write_tiny_lm, write_tiny_vision  # noqa: E402


@pytest.fixture(scope="session")
def experts(tmp_path_factory) -> dict[str, object]:
    """{"vision": {arch: path}, "lm": {arch: (path, tokenizer_path)}, "lm_plain": ...}."""
    root = tmp_path_factory.mktemp("experts")
    vision = {a: str(write_tiny_vision(root / f"v_{a}", a)) for a in VISION_ARCHS}
    lm = {a: tuple(map(str, write_tiny_lm(root / f"lm_{a}", a))) for a in LM_ARCHS}
    plain = tuple(map(str, write_tiny_lm(root / "lm_plain", "qwen2", chat_template=False)))
    return {"vision": vision, "lm": lm, "lm_plain": plain}


@pytest.fixture
def images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255), (0, 200, 0))]
