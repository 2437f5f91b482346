"""The stitched model: vision tower + bridge + language model (see seechat.model.modeling)."""

from seechat.model.bridges import BRIDGES, build_bridge
from seechat.model.build import apply_trainable, build
from seechat.model.checkpoint import load_checkpoint as load
from seechat.model.checkpoint import merge_lora, write_checkpoint
from seechat.model.modeling import SeeChatModel

__all__ = [
    "BRIDGES",
    "SeeChatModel",
    "apply_trainable",
    "build",
    "build_bridge",
    "load",
    "merge_lora",
    "write_checkpoint",
]
