"""Shared fixtures: tiny random experts of every supported architecture, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
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


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, str]:
    """A small mini world plus tiny random experts that can read it (64-px vision, char LM)."""
    from seechat.mini.world import WorldConfig, build_world

    root = tmp_path_factory.mktemp("tiny_world")
    build_world(
        root / "world", WorldConfig(n_train=64, n_val=8, n_test=16, pairs_per_shard=16), progress=False
    )
    text = (root / "world" / "text" / "lm_corpus.jsonl").read_text(encoding="utf-8")
    text += (root / "world" / "instruct" / "train.jsonl").read_text(encoding="utf-8")
    vision = write_tiny_vision(root / "vision", "chinese_clip", image_size=64)
    lm, tok = write_tiny_lm(root / "lm", "qwen2", text=text)
    return {
        "root": str(root),
        "world": str(root / "world"),
        "vision": str(vision),
        "lm": str(lm),
        "tokenizer": str(tok),
    }


@pytest.fixture(scope="session")
def world_ckpt(tiny_world, tmp_path_factory) -> Path:
    """A random stage-1-like checkpoint on the tiny world's experts: 4 image tokens, bridge only
    (read-only: the eval and mini-eval tests share it)."""
    from seechat.config import BridgeConfig, LMConfig, ModelConfig, VisionConfig
    from seechat.model import build, write_checkpoint

    cfg = ModelConfig(
        vision=VisionConfig(path=tiny_world["vision"]),
        lm=LMConfig(path=tiny_world["lm"], tokenizer_path=tiny_world["tokenizer"]),
        bridge=BridgeConfig(type="qformer", num_queries=4, num_layers=1, num_heads=2),
        max_length=256,
    )
    torch.manual_seed(0)
    model, processor = build(cfg)
    return write_checkpoint(model, processor, tmp_path_factory.mktemp("world_ckpt") / "ckpt")


def tiny_overrides(w: dict[str, str], out: str, **extra) -> list[str]:
    """key=value overrides pointing a recipe at the tiny world and experts."""
    base = {
        "model.vision.path": w["vision"],
        "model.lm.path": w["lm"],
        "model.lm.tokenizer_path": w["tokenizer"],
        "model.bridge.num_heads": 2,
        "model.max_length": 256,
        "train.output_dir": out,
        "train.log_every": 1,
        "data.num_workers": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
