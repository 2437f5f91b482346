"""train.loss_average: the documented weights, exact under micro-batching, and the loop trains with each."""

from __future__ import annotations

import json
import typing

import pytest
import torch
import torch.nn.functional as F

from seechat.config import ConfigError, LossAverage, load_config
from seechat.model.modeling import token_loss
from seechat.train.averaging import LOSS_AVERAGES, label_weights, weighted_count
from seechat.train.loop import train
from tests.conftest import tiny_overrides
from tests.train.test_loop import STAGE2

IGNORE = -100


def labels_with(counts: list[int], width: int = 12) -> torch.Tensor:
    """Rows whose labels[:, 1:] hold `counts[b]` supervised tokens each (the rest ignored)."""
    labels = torch.full((len(counts), width), IGNORE)
    for b, n in enumerate(counts):
        labels[b, width - n :] = torch.arange(n) + 3
    return labels


def _aligned(weights: torch.Tensor | None) -> torch.Tensor | None:
    """Label-position weights -> the weights of the aligned targets (labels[:, 1:])."""
    return None if weights is None else weights[:, 1:]


def test_config_choices_are_the_registry():
    assert set(typing.get_args(LossAverage)) == set(LOSS_AVERAGES)


def test_weights_and_denominators_are_as_documented():
    labels = labels_with([1, 9, 0])
    assert label_weights(labels, "token") is None
    assert weighted_count(labels, "token") == 10  # every token once
    per_row = torch.tensor([1.0, 1 / 9, 1.0]).unsqueeze(1).expand_as(labels)  # each label: its row's weight
    torch.testing.assert_close(label_weights(labels, "sample"), per_row)
    assert weighted_count(labels, "sample") == pytest.approx(2)  # the rows that have a supervised token
    torch.testing.assert_close(label_weights(labels, "square"), per_row.sqrt())
    assert weighted_count(labels, "square") == pytest.approx(1 + 3)  # sum of sqrt(n)
    for helper in (label_weights, weighted_count):
        with pytest.raises(ValueError, match="token, sample, square"):
            helper(labels, "mean")


def test_sample_average_is_the_mean_of_each_conversations_mean_and_exact_in_micro_batches():
    """The loss a step builds from micro-batches (each divided by the global weighted count) equals the
    whole batch's in value and gradient; `sample` is the mean over rows of each row's token mean."""
    torch.manual_seed(0)
    counts = [1, 2, 9, 5]
    targets = labels_with(counts)[:, 1:]  # aligned targets (B, K)
    targets = torch.where(targets == IGNORE, targets, targets % 7)
    logits = torch.randn(4, targets.shape[1], 7, requires_grad=True)
    labels = F.pad(targets, (1, 0), value=IGNORE)  # back to label layout for the weight helpers
    for average in LOSS_AVERAGES:
        den = weighted_count(labels, average)
        whole, _ = token_loss(logits, targets, den, _aligned(label_weights(labels, average)))
        (g_whole,) = torch.autograd.grad(whole, logits)
        parts = [
            token_loss(logits[s], targets[s], den, _aligned(label_weights(labels[s], average)))[0]
            for s in (slice(0, 1), slice(1, 4))
        ]
        (g_parts,) = torch.autograd.grad(sum(parts), logits)
        torch.testing.assert_close(sum(parts), whole)
        torch.testing.assert_close(g_parts, g_whole)
        kept = [targets[b] != IGNORE for b in range(4)]
        per_row = torch.stack([F.cross_entropy(logits[b][k], targets[b][k]) for b, k in enumerate(kept)])
        expected = {
            "token": (per_row * torch.tensor(counts)).sum() / sum(counts),
            "sample": per_row.mean(),
            "square": (per_row * torch.tensor(counts).sqrt()).sum() / torch.tensor(counts).sqrt().sum(),
        }[average]
        torch.testing.assert_close(whole, expected)


@pytest.mark.parametrize("average", ["sample", "square"])
def test_stage2_trains_with_each_average(tiny_world, tmp_path, average):
    out = tmp_path / average
    over = tiny_overrides(
        tiny_world,
        out,
        **{
            "train.max_steps": 2,
            "train.batch_size": 4,
            "train.grad_accum": 2,
            "train.loss_average": average,
            "train.init_from": "",  # from the base experts
            "model.bridge.type": "linear",
            "data.paths": f"{tiny_world['world']}/instruct/train.jsonl",
            "data.image_root": tiny_world["world"],
        },
    )
    train(load_config(STAGE2, over))
    rows = [json.loads(r) for r in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["loss"] < 100 for r in rows)


def test_an_unknown_average_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="'token', 'sample', 'square'"):
        load_config(STAGE2, [f"train.output_dir={tmp_path}", "train.loss_average=mean"])
