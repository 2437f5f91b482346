"""VQA answer matching and grounding box parsing / IoU."""

from __future__ import annotations

import numpy as np
import pytest

from seechat.eval.grounding import box_iou, grounding_accuracy
from seechat.eval.vqa import answers_match, vqa_accuracy


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("红色。", "红色"),  # full-width punctuation
        ("红色!", "红色"),
        ("两个", "2个"),  # 两 / 二 / 2
        ("二个", "两个"),
        ("２个", "2个"),  # full-width digit
        ("3个", "3"),  # trailing measure word dropped
        ("3", "三个"),
        ("三只", "3个"),  # the count is what is asked
        ("Red ", "red"),
    ],
)
def test_answers_that_match(prediction, answer):
    assert answers_match(prediction, answer)


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [("3个", "4"), ("3米", "3"), ("蓝色", "红色"), ("个", ""), ("红色的", "红色")],
)
def test_answers_that_do_not_match(prediction, answer):
    assert not answers_match(prediction, answer)


def test_vqa_accuracy_per_type_and_multiple_answers():
    result = vqa_accuracy(
        ["两个", "蓝色", "左边", "3"],
        ["2", "红色", ["左边", "左侧"], "三只"],
        ["count", "color", "position", "count"],
    )
    assert result.correct == [True, False, True, True]
    assert result.accuracy == pytest.approx(0.75)
    assert result.per_type == {"color": 0.0, "count": 1.0, "position": 1.0}
    assert result.type_counts == {"color": 1, "count": 2, "position": 1}


def test_iou_by_hand():
    # (0,0,10,10) vs (5,5,15,15): intersection 5*5 = 25, union 100 + 100 - 25 = 175.
    ious = box_iou(
        [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 10), (3, 3, 3, 3)],
        [(5, 5, 15, 15), (0, 0, 10, 10), (20, 20, 30, 30), (3, 3, 3, 3)],
    )
    np.testing.assert_allclose(ious, [25 / 175, 1.0, 0.0, 0.0])  # empty union -> 0, not NaN


def test_grounding_accuracy_counts_misses_as_zero():
    outputs = [
        "<box>(0,0),(100,100)</box>",
        "<box>(0,0),(50,100)</box>",
        "no box",
        "<box>(0,0),(100,100)</box>",
    ]
    targets = [(0, 0, 100, 100), (0, 0, 100, 100), (0, 0, 100, 100), (500, 500, 600, 600)]
    result = grounding_accuracy(outputs, targets)
    assert result.ious == pytest.approx([1.0, 0.5, 0.0, 0.0])  # IoU 0.5 exactly is a hit
    assert result.parsed == [True, True, False, True]
    assert result.accuracy == pytest.approx(0.5)
