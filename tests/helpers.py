"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

from seechat.config import BridgeConfig, LMConfig, ModelConfig, VisionConfig


def model_config(experts, vision="clip", lm="qwen2", bridge="mlp2x_gelu", **kw) -> ModelConfig:
    lm_path, tok_path = experts["lm"][lm] if lm != "plain" else experts["lm_plain"]
    return ModelConfig(
        vision=VisionConfig(path=experts["vision"][vision]),
        lm=LMConfig(path=lm_path, tokenizer_path=tok_path),
        bridge=BridgeConfig(type=bridge, num_queries=4, num_heads=2),
        **kw,
    )


CONVERSATION = [
    {"role": "system", "content": "你是助手。"},
    {"role": "user", "content": "<image>\n图里有什么？"},
    {"role": "assistant", "content": "红色的圆形。"},
    {"role": "user", "content": "是什么颜色？"},
    {"role": "assistant", "content": "红色。"},
]
