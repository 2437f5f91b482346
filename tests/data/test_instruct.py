"""Conversation converters (LLaVA, MiniGPT-4, messages), auto-detection, validation,
`seechat data convert`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seechat.data.instruct import (
    Conversation,
    ConvertOptions,
    DataFormatError,
    ImagePathError,
    Message,
    image_path,
    load_conversations,
    write_conversations,
)

LLAVA = [
    {
        "id": "000000033471",
        "image": "coco/000000033471.jpg",
        "conversations": [
            {"from": "human", "value": "What are the colors of the bus?\n<image>"},
            {"from": "gpt", "value": "The bus is white and red."},
            {"from": "human", "value": "What feature can be seen on the back?"},
            {"from": "gpt", "value": "An advertisement."},
        ],
    },
    {"id": 7, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    {
        "id": "multi",
        "image": ["a.jpg", "b.jpg"],
        "conversations": [
            {"from": "system", "value": "You are helpful."},
            {"from": "human", "value": "Compare <image> and <image>."},
            {"from": "gpt", "value": "Both are cats."},
        ],
    },
]


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["llava.json", "llava.jsonl", "lines.json"])
def test_llava_json_and_jsonl(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    write_jsonl(path, LLAVA) if name != "llava.json" else write_json(path, LLAVA)
    first, second, third = load_conversations(path)
    assert first.id == "000000033471" and first.images == ["coco/000000033471.jpg"]
    assert [m.role for m in first.messages] == ["user", "assistant", "user", "assistant"]
    assert first.messages[0].content.endswith("<image>")
    assert second == Conversation("7", [], [Message("user", "Hi"), Message("assistant", "Hello")])
    assert third.images == ["a.jpg", "b.jpg"] and third.messages[0] == Message("system", "You are helpful.")


def test_missing_marker_is_inserted_for_one_image(tmp_path: Path) -> None:
    record = {
        "id": "x",
        "image": "a.jpg",
        "conversations": [{"from": "human", "value": "描述"}, {"from": "gpt", "value": "猫"}],
    }
    (conv,) = load_conversations(write_json(tmp_path / "d.json", [record]))
    assert conv.messages[0] == Message("user", "<image>\n描述")


def test_marker_count_mismatch_names_file_record_and_id(tmp_path: Path) -> None:
    two_images_no_marker = {
        **LLAVA[2],
        "conversations": [{"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Cats."}],
    }
    path = write_json(tmp_path / "llava.json", [*LLAVA, two_images_no_marker])
    with pytest.raises(DataFormatError) as err:
        load_conversations(path)
    # one marker gets inserted, which is still one short of two images
    assert err.value.where == "record 3" and err.value.record_id == "multi"
    assert "llava.json: record 3 (id='multi'): 1 <image> markers but 2 images" in str(err.value)


@pytest.mark.parametrize(
    ("conversations", "reason"),
    [
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], "roles must be"),
        ([{"from": "human", "value": "a"}], "roles must be"),
        (
            [{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}],
            r"message 1 \(assistant\) is empty",
        ),
        ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image>"}], "only user messages"),
        ([{"from": "robot", "value": "a"}], "unknown speaker"),
    ],
)
def test_validation_errors(tmp_path: Path, conversations: list, reason: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [LLAVA[1], {"id": "bad", "conversations": conversations}])
    with pytest.raises(DataFormatError, match=reason) as err:
        load_conversations(path)
    assert err.value.where == "line 2" and err.value.record_id == "bad"


def test_image_files_checked_only_with_a_root(tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", [LLAVA[0]])
    assert len(load_conversations(path)) == 1
    with pytest.raises(DataFormatError, match="not found"):
        load_conversations(path, image_root=tmp_path)
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "000000033471.jpg").write_bytes(b"x")
    assert len(load_conversations(path, image_root=tmp_path)) == 1


def test_image_paths_leading_out_of_the_root_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    assert image_path(root, "coco/../coco/1.jpg") == root / "coco" / "1.jpg"
    assert image_path(root, str(root / "coco" / "1.jpg")) == root / "coco" / "1.jpg"  # absolute, inside
    for name in ("../secret.jpg", "coco/../../secret.jpg", "/etc/passwd", str(tmp_path / "data2" / "x.jpg")):
        with pytest.raises(ImagePathError, match="outside the image root"):
            image_path(root, name)
    (tmp_path / "secret.jpg").write_bytes(b"x")  # exists, but is not the data's to name
    escaping = {**LLAVA[0], "image": "../secret.jpg"}
    path = write_json(tmp_path / "d.json", [escaping])
    with pytest.raises(DataFormatError, match="outside the image root"):
        load_conversations(path, image_root=root)


def test_minigpt4_filter_cap(tmp_path: Path) -> None:
    data = {
        "annotations": [{"image_id": "2", "caption": "A cat sits."}, {"image_id": "10", "caption": "A dog."}]
    }
    path = write_json(tmp_path / "filter_cap.json", data)
    first, second = load_conversations(path)
    assert first == Conversation(
        "2",
        ["2.jpg"],
        [Message("user", "<image>\n请详细描述这张图片。"), Message("assistant", "A cat sits.")],
    )
    options = ConvertOptions(caption_instruction="用一句话描述图片。", image_template="image/{image_id}.jpg")
    (_, custom) = load_conversations(path, "minigpt4", options=options)
    assert custom.images == ["image/10.jpg"]
    assert custom.messages[0].content == "<image>\n用一句话描述图片。"


def test_messages_jsonl_with_parts_and_round_trip(tmp_path: Path) -> None:
    records = [
        {
            "messages": [
                {"role": "user", "content": "<image>这是什么?"},
                {"role": "assistant", "content": "一只猫。"},
            ],
            "images": ["c.jpg"],
        },
        {
            "id": "parts",
            "images": ["d.jpg"],
            "messages": [
                {"role": "system", "content": "你是助手。"},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "颜色?"}]},
                {"role": "assistant", "content": "红色。"},
            ],
        },
    ]
    convs = load_conversations(write_jsonl(tmp_path / "m.jsonl", records))
    assert convs[0].id == "0" and convs[1].messages[1].content == "<image>\n颜色?"
    out = tmp_path / "ours.jsonl"
    assert write_conversations(convs, out) == 2
    assert "一只猫" in out.read_text(encoding="utf-8")  # UTF-8, not \\u escapes
    assert load_conversations(out) == convs


def test_undetectable_format(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="cannot detect"):
        load_conversations(write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}]))
