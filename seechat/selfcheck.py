"""`seechat selfcheck`: prove an install works without downloading anything.

Builds tiny random instances of the real architectures (a CLIP vision model and a Qwen2 LM),
stitches them with a bridge, runs one training step, saves and reloads the checkpoint, and chats
one turn about a generated image. The reply is gibberish — the weights are random — but every
code path a real model takes has run.

What this module is not: the command line (`seechat.cli.selfcheck` prints the returned report).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from seechat.config import BridgeConfig, LMConfig, ModelConfig, TrainableConfig, VisionConfig
from seechat.data.collate import collate
from seechat.infer.chat import ChatSession
from seechat.infer.sampling import SamplingParams
from seechat.model import apply_trainable, build, load, write_checkpoint
from seechat.model.tiny import write_tiny_lm, write_tiny_vision


@dataclass(frozen=True)
class SelfCheck:
    """What the check did: every number a person would want to see that it ran."""

    bridge: str
    image_tokens: int  # per image, after the bridge
    loss: float  # of the one training step
    checkpoint: str  # where it was saved (a temporary folder, gone now)
    checkpoint_files: list[str]
    reply: str  # the reloaded model's answer (random weights: gibberish)
    seconds: float


def selfcheck(bridge: str = "qformer") -> SelfCheck:
    """Build, train one step, save, reload and chat one turn; raises on the first thing that fails."""
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vision = write_tiny_vision(root / "vision", "clip")
        lm, tok = write_tiny_lm(root / "lm", "qwen2")
        cfg = ModelConfig(
            vision=VisionConfig(path=str(vision)),
            lm=LMConfig(path=str(lm), tokenizer_path=str(tok)),
            bridge=BridgeConfig(type=bridge, num_queries=8, num_heads=2),
        )
        model, proc = build(cfg)
        apply_trainable(model, TrainableConfig(bridge="full", lm="lora"))
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill="red")
        conv = [
            {"role": "user", "content": "<image>\n图里有什么？"},
            {"role": "assistant", "content": "红色的圆形。"},
        ]
        batch = collate([proc.encode_conversation(conv, [image])], proc.tokenizer.pad_token_id)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        image_tokens = model.num_image_tokens
        write_checkpoint(model, proc, root / "ckpt")
        model, proc = load(root / "ckpt")
        files = sorted(p.name for p in (root / "ckpt").iterdir())
        reply = ChatSession(model, proc).ask("图里有什么？", [image], SamplingParams(max_new_tokens=12))
    return SelfCheck(bridge, image_tokens, loss.item(), str(root / "ckpt"), files, reply, time.time() - t0)
