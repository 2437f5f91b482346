"""Detection mAP@0.5 and recall per class on hand-made predictions whose numbers are known."""

from __future__ import annotations

import math

import pytest

from seechat.eval.detection import Prediction, average_precision, detection_metrics, parse_detections
from seechat.mini.scenes import SHAPES

A = (0.0, 0.0, 100.0, 100.0)
B = (500.0, 500.0, 700.0, 700.0)
C = (200.0, 0.0, 400.0, 300.0)
NEAR_A = (0.0, 0.0, 100.0, 120.0)  # IoU 100/120 = 0.83 with A
HALF_A = (0.0, 0.0, 100.0, 40.0)  # IoU 0.4 with A: a miss at 0.5


def test_perfect_predictions_give_map_1():
    gt = [[("圆形", A), ("正方形", B)], [("圆形", C)]]
    preds = [[Prediction("正方形", B), Prediction("圆形", NEAR_A)], [Prediction("圆形", C)]]
    r = detection_metrics(gt, preds)
    assert r.map == 1.0 and r.recall_by_class == {"圆形": 1.0, "正方形": 1.0}
    assert r.true_positives == 3 and r.predictions == 3


def test_unscored_predictions_give_precision_times_recall():
    # 圆形: 2 ground truth; predicted one hit and one miss (IoU 0.4) -> P 1/2, R 1/2, AP 1/4.
    # 正方形: 1 ground truth, predicted under the wrong label -> AP 0, recall 0.
    gt = [[("圆形", A), ("圆形", C), ("正方形", B)]]
    preds = [[Prediction("圆形", C), Prediction("圆形", HALF_A), Prediction("三角形", B)]]
    r = detection_metrics(gt, preds)
    assert r.ap_by_class == {"圆形": 0.25, "正方形": 0.0}
    assert r.map == pytest.approx(0.125)
    assert r.recall_by_class == {"圆形": 0.5, "正方形": 0.0}


def test_scored_predictions_follow_the_voc_all_point_curve():
    # ranked: hit (R .5, P 1), miss (R .5, P .5), hit (R 1, P 2/3): AP = .5 * 1 + .5 * 2/3 = 5/6
    gt = [[("圆形", A)], [("圆形", B)]]
    preds = [[Prediction("圆形", A, 0.9)], [Prediction("圆形", C, 0.8), Prediction("圆形", B, 0.7)]]
    assert detection_metrics(gt, preds).map == pytest.approx(5 / 6)
    # the same predictions with the miss ranked last: AP 1
    preds[1][0] = Prediction("圆形", C, 0.1)
    assert detection_metrics(gt, preds).map == pytest.approx(1.0)


def test_a_duplicate_box_is_a_false_positive_and_ties_do_not_depend_on_order():
    gt = [[("星形", A)]]
    dup = [[Prediction("星形", A), Prediction("星形", NEAR_A)]]  # both match A; only one may
    r = detection_metrics(gt, dup)
    assert r.ap_by_class["星形"] == pytest.approx(0.5) and r.recall_by_class["星形"] == 1.0
    assert detection_metrics(gt, [dup[0][::-1]]).map == r.map
    assert average_precision([1.0, 1.0, 1.0, 1.0], [False, True, False, True], 4) == pytest.approx(0.25)
    assert math.isnan(average_precision([], [], 0)) and average_precision([], [], 3) == 0.0


def test_parse_detections_labels_each_box_with_the_last_class_before_it():
    text = (
        "红色的圆形<box>(0,0),(100,100)</box>，蓝色的正方形和<box>(500,500),(700,700)</box>，"
        "<box>(1,1),(2,2)</box>"
    )
    text += "，紫色的长方形<box>(9,9),(5,5)</box>，黄色的星形<box>（10,10）,(20,20)</box>"
    got = parse_detections(text, SHAPES)
    # the third box has no class name since the previous box; the fourth is malformed (x1 > x2)
    assert got == [
        Prediction("圆形", A),
        Prediction("正方形", B),
        Prediction("星形", (10.0, 10.0, 20.0, 20.0)),
    ]
    assert parse_detections("没有图形。", SHAPES) == []
