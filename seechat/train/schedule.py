"""The one learning-rate schedule: linear warmup, then cosine decay to a floor.

`warmup_cosine(step, warmup_steps, total_steps, min_ratio)` is the multiplier of the peak learning
rate at optimizer step `step` (0-based): (step + 1) / warmup_steps during warmup, then a half
cosine from 1 down to `min_ratio` at `total_steps`, and `min_ratio` after it. The training loop
(`seechat.train.loop`, peak `optim.lr`) and the mini-expert recipes (`seechat.mini.expert_training`,
through `torch.optim.lr_scheduler.LambdaLR`) both use it.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup to 1, cosine to `min_ratio`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
