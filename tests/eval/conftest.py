"""Fixtures for seechat.eval tests: a tiny random Chinese-CLIP saved like a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    BertTokenizerFast,
    ChineseCLIPConfig,
    ChineseCLIPImageProcessor,
    ChineseCLIPModel,
    ChineseCLIPProcessor,
)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARACTERS = list(
    dict.fromkeys("一二两三四个只图中有红色蓝绿黄的圆形方块三角在上下左右是和大小")
)  # unique: a repeated vocab line would give ids past vocab_size


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random ChineseCLIPModel (projection dim 8, 32 px images) with tokenizer and image processor."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_chinese_clip")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + CHARACTERS + list("0123456789")) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(vocab))  # transformers 5 takes vocab=, not vocab_file=
    layers = dict(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32)
    config = ChineseCLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=32, **layers),
        vision_config=dict(image_size=32, patch_size=16, **layers),
        projection_dim=8,
    )
    ChineseCLIPModel(config).save_pretrained(root)
    image_processor = ChineseCLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    ChineseCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root)
    return root
