"""stitch_val.py with learned row + column embeddings (zero-initialised, one D_lm vector per row and per
column of the token grid) added to the mlp2x_gelu bridge's output: the bridge's 2-D position lever of
docs/mini-world-results.md. Same arguments as stitch_val.py; train stage 1 too (the new parameters
learn there). Not package code: it patches the bridge class in this process only.
"""

import math
import runpy

import torch
from torch import nn

from seechat.model import bridges

_init, _fwd = bridges.MLPBridge.__init__, bridges.MLPBridge.forward


def __init__(self, d_vision, d_lm, num_patches, cfg):
    _init(self, d_vision, d_lm, num_patches, cfg)
    g = math.isqrt(self.num_tokens)
    self.row = nn.Parameter(torch.zeros(g, 1, d_lm))
    self.col = nn.Parameter(torch.zeros(1, g, d_lm))


def forward(self, x):
    y = _fwd(self, x)
    return y + (self.row + self.col).reshape(1, -1, y.shape[-1]).to(y.dtype)


bridges.MLPBridge.__init__, bridges.MLPBridge.forward = __init__, forward
runpy.run_path("docs/experiments/mini_experts/stitch_val.py", run_name="__main__")
