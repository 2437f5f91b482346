"""Training data readers do not trust their inputs: a decompression bomb, a path leading out of
the image root or a corrupt file skips that sample (logged, counted in the skip log) and training
goes on; a good sample next to them is used."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from seechat.config import DataConfig, load_config
from seechat.model import build
from seechat.train.data import BatchStream, StreamSpec, UnusableImage, open_training_image
from seechat.train.loop import _skipped
from tests.conftest import tiny_overrides
from tests.helpers import model_config
from tests.train.test_loop import STAGE1, STAGE2


def png_declaring(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG whose header claims width x height pixels: a decompression bomb
    as far as any reader that trusts the header is concerned."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """data/images/{good.png, bomb.png, garbage.png}; secret.png beside data/, outside the root."""
    root = tmp_path / "data" / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 12), (200, 30, 30)).save(root / "sub" / "good.png")
    (root / "bomb.png").write_bytes(png_declaring(30_000, 30_000))  # 900 M pixels
    (root / "garbage.png").write_bytes(b"not an image")
    Image.new("RGB", (16, 12), (0, 0, 0)).save(tmp_path / "secret.png")  # readable, but not data
    return root


def test_open_training_image_refuses_bombs_escapes_and_garbage(image_tree: Path) -> None:
    assert open_training_image(image_tree, "sub/good.png").size == (16, 12)
    assert open_training_image(image_tree, "sub/../sub/good.png").mode == "RGB"
    assert open_training_image(image_tree, str(image_tree / "sub" / "good.png")).size == (
        16,
        12,
    )  # absolute, inside
    cases = {
        "bomb.png": "too large to decode safely",
        "../../secret.png": "outside the image root",
        str(image_tree.parents[1] / "secret.png"): "outside the image root",
        "sub/../../../secret.png": "outside the image root",
        "garbage.png": "unreadable image",
        "missing.png": "unreadable image",
    }
    for name, message in cases.items():
        with pytest.raises(UnusableImage, match=message):
            open_training_image(image_tree, name)


def test_bad_conversations_are_skipped_and_counted_and_training_data_goes_on(experts, image_tree, tmp_path):
    """Before: the bomb raised DecompressionBombError out of the DataLoader and stopped training."""
    _, processor = build(model_config(experts))
    rows = [
        ("good", "sub/good.png"),
        ("bomb", "bomb.png"),
        ("escape", "../../secret.png"),
        ("garbage", "garbage.png"),
        ("good2", "sub/good.png"),
    ]
    data = tmp_path / "data" / "train.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for sample_id, image in rows:
            messages = [
                {"role": "user", "content": "<image>\n这是什么？"},
                {"role": "assistant", "content": "一个红色方块。"},
            ]
            f.write(
                json.dumps({"id": sample_id, "images": [image], "messages": messages}, ensure_ascii=False)
                + "\n"
            )
    cfg = DataConfig(kind="conversations", paths=(str(data),), image_root=str(image_tree))
    skips = tmp_path / "run" / "skipped"
    stream = BatchStream(
        cfg, processor, StreamSpec(batch_size=5, seed=0, rank=0, world_size=1), False, skip_log_dir=skips
    )
    batch = next(stream)  # one batch of all five rows: the two good ones survive
    assert batch["input_ids"].shape[0] == 2
    report = _skipped(skips)
    assert report["count"] == 3 and sorted(report["keys"]) == ["bomb", "escape", "garbage"]
    reasons = [
        json.loads(line)["reason"] for f in skips.glob("*.jsonl") for line in f.read_text().splitlines()
    ]
    assert any("outside the image root" in r for r in reasons) and any("too large" in r for r in reasons)


@pytest.mark.parametrize("kind", ["pairs", "conversations"])
def test_padding_free_stream_holds_the_padded_streams_samples(tiny_world, kind):
    """`train.padding_free` lays out the same samples in the same order, only without the padding."""
    world = tiny_world["world"]
    recipe, data = {
        "pairs": (STAGE1, {"data.paths": f"{world}/pairs/train/{{00000..00003}}.tar"}),
        "conversations": (
            STAGE2,
            {"data.paths": f"{world}/instruct/train.jsonl", "data.image_root": world},
        ),
    }[kind]
    cfg = load_config(recipe, tiny_overrides(tiny_world, "unused", **data))
    _, processor = build(cfg.model)
    spec = StreamSpec(batch_size=4, seed=0, rank=0, world_size=1)
    padded = BatchStream(cfg.data, processor, spec, True)
    free = BatchStream(cfg.data, processor, spec, True, padding_free=True)
    for _ in range(3):
        a, b = next(padded), next(free)
        lengths = a["attention_mask"].sum(1)
        rows = [a["input_ids"][i, :n] for i, n in enumerate(lengths)]
        assert b["input_ids"].shape[0] == 1 and torch.equal(torch.cat(rows), b["input_ids"][0])
        assert b["cu_seq_lens"].diff().tolist() == lengths.tolist()
        assert torch.equal(a["pixel_values"], b["pixel_values"])
