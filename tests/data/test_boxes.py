"""The `<box>` format's one rule set: writing in the 0..1000 frame, and the strict first-box parser."""

from __future__ import annotations

import pytest

from seechat.data.boxes import box_text, denormalize_box, format_box, normalize_box, parse_box


def test_format_and_normalise() -> None:
    text = format_box((16, 8, 32, 64), 64)
    assert text == "<box>(250,125),(500,1000)</box>"  # the mini world's exact bytes
    assert box_text((250, 125, 500, 1000)) == text
    assert normalize_box((0, 0, 100, 50), (200, 100)) == (0, 0, 500, 500)
    assert normalize_box((-5, 0, 300, 50), (200, 100)) == (0, 0, 1000, 500)  # clamped into the frame
    assert denormalize_box((0, 0, 500, 500), (200, 100)) == (0.0, 0.0, 100.0, 50.0)


def test_written_boxes_parse_back() -> None:
    for bbox, size in [((16, 8, 32, 64), 64), ((1, 2, 3, 4), (10, 20)), ((0, 0, 7, 7), 7)]:
        assert parse_box(f"在这里：{format_box(bbox, size)}。") == normalize_box(bbox, size)


def test_parse_accepts_the_variants_models_write() -> None:
    assert parse_box("在<box>(100,200),(300,400)</box>这里") == (100.0, 200.0, 300.0, 400.0)
    assert parse_box("<box>( 1, 2 ),(3,4)</box>") == (1, 2, 3, 4)  # spaces; ints compare equal
    assert parse_box("<box>( 1.5 , 2 ) , (3,4)</box>") == (1.5, 2.0, 3.0, 4.0)  # decimals
    assert parse_box("<box>(1,2)(3,4)</box>") == (1.0, 2.0, 3.0, 4.0)  # comma between pairs optional
    assert parse_box("<box>（10，20），（30，40）</box>") == (10.0, 20.0, 30.0, 40.0)  # full-width
    assert parse_box("<box>(0,0),(1000,1000)</box>") == (0.0, 0.0, 1000.0, 1000.0)  # edges included


def test_only_the_first_box_counts() -> None:
    assert parse_box("<box>(1,2),(3,4)</box><box>(5,6),(7,8)</box>") == (1.0, 2.0, 3.0, 4.0)
    # a malformed first box is a miss even when a later one is well-formed (no second chance)
    assert parse_box("<box>(1,2)</box><box>(5,6),(7,8)</box>") is None


@pytest.mark.parametrize(
    "text",
    [
        "没有框",
        "<box>(1,2),(3,4)",  # not closed
        "<box>(a,2),(3,4)</box>",  # not a number
        "<box>(0,0),(1001,10)</box>",  # out of the frame
        "<box>(-1,0),(10,10)</box>",
        "<box>(50,0),(10,10)</box>",  # x1 > x2
        "<box>(0,50),(10,10)</box>",  # y1 > y2
        "<box>(1,2,3),(3,4)</box>",  # not two pairs
        "<box>(1,2),(3,4),(5,6)</box>",
    ],
)
def test_malformed_boxes_are_misses(text: str) -> None:
    assert parse_box(text) is None
