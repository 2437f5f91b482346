"""Batching encoded samples: pad token ids and labels, concatenate pixel values.

Training pads on the right (labels -100 on padding); generation pads on the left so that every
row's next token is at the last position. Pixel values of all samples are concatenated in batch
order, which is the order the model scatters image features into image-token positions.

`collate_padding_free` lays the samples end to end in one row instead (no padding at all): position
ids restart at each sample and `cu_seq_lens` marks the boundaries, which the LM's varlen attention
(`seechat.model.varlen`) keeps apart. The same samples, the same loss; fewer tokens computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from seechat.data.conversation import IGNORE_INDEX
from seechat.data.processor import Encoded


def collate(samples: Sequence[Encoded], pad_id: int, side: str = "right") -> dict[str, torch.Tensor | None]:
    """-> input_ids (B, T), attention_mask (B, T), labels (B, T) or None, pixel_values (n, 3, H, W)
    or None."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', not {side!r}")
    width = max(s.input_ids.shape[0] for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    has_labels = all(s.labels is not None for s in samples)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long) if has_labels else None
    for i, s in enumerate(samples):
        n = s.input_ids.shape[0]
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = s.input_ids
        mask[i, cols] = 1
        if labels is not None:
            labels[i, cols] = s.labels
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": torch.cat(pixels) if pixels else None,
    }


def collate_padding_free(samples: Sequence[Encoded]) -> dict[str, torch.Tensor | int | None]:
    """-> input_ids (1, N), labels (1, N) or None, position_ids (1, N), cu_seq_lens (S + 1,) int32,
    max_seq_len (the longest sample), pixel_values (n, 3, H, W) or None; N = the samples' tokens.

    Each sample's first label is set to -100: it would be the target of the previous sample's last
    token, and no target may cross a boundary (a conversation starts with an unsupervised prompt
    token anyway, so this only guards a hand-made sample)."""
    lengths = [s.input_ids.shape[0] for s in samples]
    has_labels = all(s.labels is not None for s in samples)
    labels = None
    if has_labels:
        labels = torch.cat([s.labels for s in samples])  # a new tensor: the samples stay as they were
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        labels[starts] = IGNORE_INDEX
        labels = labels.unsqueeze(0)
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    return {
        "input_ids": torch.cat([s.input_ids for s in samples]).unsqueeze(0),
        "labels": labels,
        "position_ids": torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0),
        "cu_seq_lens": cu,
        "max_seq_len": max(lengths),
        "pixel_values": torch.cat(pixels) if pixels else None,
    }
