"""Tiny random instances of the real transformers architectures, written to disk as checkpoints.

These are the real classes (CLIP / Chinese-CLIP / SigLIP vision models; Qwen2 / Llama / GLM-4
causal LMs) at toy sizes, saved with `save_pretrained` so they load through exactly the code path
a hub id takes. Tests and `seechat selfcheck` use them; nothing here is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    ChineseCLIPVisionConfig,
    CLIPImageProcessor,
    CLIPVisionConfig,
    Glm4Config,
    LlamaConfig,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from seechat.data.char_tokenizer import CHATML_TEMPLATE, build_char_tokenizer

VISION_ARCHS = ("clip", "chinese_clip", "siglip")
LM_ARCHS = ("qwen2", "llama", "glm4")

SAMPLE_TEXT = "你好世界，这是一张图片。图里有红色的圆形和蓝色的正方形。请描述问答是否几个颜色形状位置左右上下"


def _vision_config(arch: str, image_size: int, patch_size: int, hidden: int):
    common = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    configs = {
        "clip": CLIPVisionConfig,
        "chinese_clip": ChineseCLIPVisionConfig,
        "siglip": SiglipVisionConfig,
    }
    return configs[arch](**common)


def write_tiny_vision(
    directory: str | Path,
    arch: str = "clip",
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 32,
    seed: int = 0,
) -> Path:
    """A random vision encoder + its image processor saved to `directory`."""
    if arch not in VISION_ARCHS:
        raise ValueError(f"unknown tiny vision arch {arch!r}; choose from {', '.join(VISION_ARCHS)}")
    torch.manual_seed(seed)
    model = AutoModel.from_config(_vision_config(arch, image_size, patch_size, hidden))
    d = Path(directory)
    model.save_pretrained(d)
    size = {"height": image_size, "width": image_size}
    if arch == "siglip":
        proc = SiglipImageProcessor(size=size)
    else:
        proc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size)
    proc.save_pretrained(d)
    return d


def _lm_config(arch: str, vocab: int, hidden: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if arch == "glm4":
        return Glm4Config(**common, head_dim=hidden // 4, pad_token_id=0, eos_token_id=1)
    return {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch](**common)


def write_tiny_lm(
    directory: str | Path,
    arch: str = "qwen2",
    hidden: int = 32,
    seed: int = 0,
    chat_template: bool = True,
    text: str = SAMPLE_TEXT,
) -> tuple[Path, Path]:
    """A random causal LM saved to `directory` and a project-built character tokenizer saved to
    `directory/tokenizer`; returns both paths (`LMConfig(path=..., tokenizer_path=...)`).

    The tokenizer gets its own folder because `AutoTokenizer` on a folder with a Qwen2 config.json
    picks the Qwen2 byte-level tokenizer class, which cannot read a character-level vocabulary.
    """
    if arch not in LM_ARCHS:
        raise ValueError(f"unknown tiny LM arch {arch!r}; choose from {', '.join(LM_ARCHS)}")
    tokenizer = build_char_tokenizer([text], chat_template=CHATML_TEMPLATE if chat_template else None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_lm_config(arch, len(tokenizer), hidden))
    d = Path(directory)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d / "tokenizer")
    return d, d / "tokenizer"
