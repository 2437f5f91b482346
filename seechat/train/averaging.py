"""How a training step averages its token losses (`train.loss_average`): how much a short reply weighs
against a long one in the objective.

- `token`  (default; LLaVA, transformers' Trainer): every supervised token counts once, and the loss is
           the mean over the global batch's tokens. A conversation weighs as much as its replies are
           long, so in a mix of one-word answers and 100-token descriptions or box lists the short
           answers get a small share of the gradient (the mini world's stage 2: VQA is 30 % of the
           conversations and 2.5 % of the supervised tokens).
- `sample` every conversation counts once: the mean of its own tokens, then the mean over conversations.
- `square` (InternVL 2.5's "square averaging"): each token of a conversation with n supervised tokens
           weighs 1 / sqrt(n), between the two.

All three stay exact under gradient accumulation and data parallelism: a row's weight depends only on
its own labels, and a step divides the weighted sum by the global sum of weight x tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from seechat.data.conversation import IGNORE_INDEX

# average -> per-row token weight as a function of the row's supervised-token count n (B,) float64
LOSS_AVERAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "token": torch.ones_like,
    "sample": lambda n: 1.0 / n.clamp(min=1),
    "square": lambda n: n.clamp(min=1).rsqrt(),
}


def supervised_per_row(labels: torch.Tensor) -> torch.Tensor:
    """Supervised next-token targets of each row (labels[:, 1:] != -100). (B,) float64"""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).double()


def _weight(average: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if average not in LOSS_AVERAGES:
        raise ValueError(f"unknown loss average {average!r}; choose one of: {', '.join(LOSS_AVERAGES)}")
    return LOSS_AVERAGES[average]


def row_weights(labels: torch.Tensor, average: str) -> torch.Tensor | None:
    """Each row's token weight under `average`; None for `token` (the plain sum, no weights). (B,)"""
    weight = _weight(average)
    return None if average == "token" else weight(supervised_per_row(labels)).float()


def weighted_count(labels: torch.Tensor, average: str) -> float:
    """This batch's share of the step's denominator: sum over rows of weight x supervised tokens (the
    token count for `token`, the rows with a supervised token for `sample`)."""
    n = supervised_per_row(labels)
    return float((_weight(average)(n) * n).sum())
