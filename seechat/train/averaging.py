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

All three stay exact under gradient accumulation and data parallelism: a conversation's weight depends
only on its own labels, and a step divides the weighted sum by the global sum of weight x tokens. A
conversation is a row of a padded batch or a segment of a padding-free one (`cu_seq_lens`): the same
weights either way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from seechat.data.conversation import IGNORE_INDEX
from seechat.model.varlen import sequence_ids

# average -> a conversation's token weight as a function of its supervised-token count n (S,) float64
LOSS_AVERAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "token": torch.ones_like,
    "sample": lambda n: 1.0 / n.clamp(min=1),
    "square": lambda n: n.clamp(min=1).rsqrt(),
}


def sequence_index(labels: torch.Tensor, cu_seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Which sequence each label position belongs to: its row in a padded batch, its segment in a
    padding-free row (`cu_seq_lens`, seechat.data.collate.collate_padding_free). (B, T) long"""
    b, t = labels.shape
    if cu_seq_lens is None:
        return torch.arange(b, device=labels.device).unsqueeze(1).expand(b, t)
    return sequence_ids(cu_seq_lens).to(labels.device).view(b, t)


def _targets(labels: torch.Tensor) -> torch.Tensor:
    """Label positions that are next-token targets: supervised, and not a row's first. (B, T) bool"""
    sup = labels != IGNORE_INDEX
    sup[:, 0] = False
    return sup


def supervised_per_sequence(labels: torch.Tensor, cu_seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Supervised next-token targets of each sequence (a row, or a padding-free segment). (S,) float64"""
    seq = sequence_index(labels, cu_seq_lens)
    n_seq = labels.shape[0] if cu_seq_lens is None else cu_seq_lens.numel() - 1
    return torch.bincount(seq[_targets(labels)], minlength=n_seq).double()


def _weight(average: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if average not in LOSS_AVERAGES:
        raise ValueError(f"unknown loss average {average!r}; choose one of: {', '.join(LOSS_AVERAGES)}")
    return LOSS_AVERAGES[average]


def label_weights(
    labels: torch.Tensor, average: str, cu_seq_lens: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Each label position's token weight under `average`: its sequence's weight; None for `token`
    (the plain sum, no weights). (B, T) float32"""
    weight = _weight(average)
    if average == "token":
        return None
    per_sequence = weight(supervised_per_sequence(labels, cu_seq_lens)).float()
    return per_sequence[sequence_index(labels, cu_seq_lens)]


def weighted_count(labels: torch.Tensor, average: str, cu_seq_lens: torch.Tensor | None = None) -> float:
    """This batch's share of the step's denominator: sum over sequences of weight x supervised tokens
    (the token count for `token`, the sequences that have a supervised token for `sample`)."""
    n = supervised_per_sequence(labels, cu_seq_lens)
    return float((_weight(average)(n) * n).sum())
