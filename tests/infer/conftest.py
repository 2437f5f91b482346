"""Fixtures for seechat.infer tests: a tiny random checkpoint per LM architecture, loaded once."""

from __future__ import annotations

import pytest

from seechat.model import load
from tests.infer.tiny_engine import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(experts, tmp_path_factory):
    """lm arch -> a tiny mlp2x_gelu checkpoint directory."""
    root = tmp_path_factory.mktemp("infer_ckpt")
    return {lm: write_tiny_checkpoint(experts, root / lm, lm) for lm in ("qwen2", "glm4")}


@pytest.fixture(scope="session")
def tiny(tiny_ckpt):
    """(model, processor) of the qwen2 checkpoint (fast decode path)."""
    return load(tiny_ckpt["qwen2"])


@pytest.fixture(scope="session")
def tiny_glm(tiny_ckpt):
    """(model, processor) of the glm4 checkpoint (generic transformers decode path)."""
    return load(tiny_ckpt["glm4"])
