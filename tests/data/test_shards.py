"""Shard reading (the one iteration), ShardWriter layout/rollover/stats, image re-encoding, table
conversion and `seechat data shards`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from seechat.data.shards import (
    PairRecord,
    ShardInputError,
    ShardWriter,
    UnreadMember,
    encode_image,
    expand_shards,
    iter_tar_member_names,
    iter_tar_samples,
    read_pair_table,
    resized_size,
    split_key,
    write_pair_shards,
)


def jpeg(size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG")
    return out.getvalue()


def test_rollover_by_sample_count_layout_and_stats(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, max_samples_per_shard=3) as writer:
        for i in range(7):
            writer.write(f"k{i:03d}", jpeg(), f"第{i}张", {"i": i})
        writer.add_failure("bad001", "OSError: cannot identify image")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json",
        "00002.tar", "00002_stats.json", "stats.json",
    ]  # fmt: skip
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert tar.getnames() == [f"k00{i}.{ext}" for i in range(3) for ext in ("jpg", "txt", "json")]
    summary = json.loads((tmp_path / "stats.json").read_text())
    assert summary["samples"] == 7 and summary["num_shards"] == 3 and summary["failures"] == 1
    assert summary["failed"] == [{"key": "bad001", "reason": "OSError: cannot identify image"}]
    last = json.loads((tmp_path / "00002_stats.json").read_text())
    assert last["successes"] == 1 and last["failures"] == 1 and last["count"] == 2
    assert summary["bytes"] == sum((tmp_path / n).stat().st_size for n in summary["shards"])


def test_rollover_by_bytes_keeps_shards_under_the_limit(tmp_path: Path) -> None:
    limit = 60_000
    with ShardWriter(tmp_path, max_bytes_per_shard=limit) as writer:
        for i in range(20):
            writer.write(f"k{i}", bytes(7000), "t", {})
    sizes = [p.stat().st_size for p in sorted(tmp_path.glob("*.tar"))]
    assert len(sizes) > 1 and all(size <= limit for size in sizes)
    assert json.loads((tmp_path / "stats.json").read_text())["samples"] == 20


def test_readable_by_webdataset(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, max_samples_per_shard=2) as writer:
        for i in range(3):
            writer.write(f"s{i}", jpeg(), f"猫{i}", {"source": "web"})
    urls = str(tmp_path / "{00000..00001}.tar")
    pipeline = (
        wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    )
    rows = list(pipeline)
    assert [r[0] for r in rows] == ["s0", "s1", "s2"]
    assert rows[1][1].size == (8, 6) and rows[1][2] == "猫1"
    assert rows[2][3] == {"key": "s2", "caption": "猫2", "source": "web"}


def test_writer_refuses_to_mix_runs_and_bad_keys(tmp_path: Path) -> None:
    with ShardWriter(tmp_path) as writer:
        writer.write("a", jpeg(), "t", {})
        with pytest.raises(ValueError, match="invalid sample key"):
            writer.write("a.b", jpeg(), "t", {})
        with pytest.raises(ValueError, match="duplicate"):
            writer.write("a", jpeg(), "t", {})
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path)
    with ShardWriter(tmp_path, overwrite=True) as writer:
        writer.write("b", jpeg(), "t", {})
    assert not list(tmp_path.glob("*.tmp"))


def test_error_inside_writer_leaves_only_complete_shards(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, max_samples_per_shard=2) as writer:
        for i in range(3):
            writer.write(f"k{i}", jpeg(), "t", {})
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00000_stats.json"]


def test_resized_size_keeps_aspect_and_never_enlarges() -> None:
    assert resized_size(400, 200, resize=100, max_side=None) == (200, 100)
    assert resized_size(400, 200, resize=None, max_side=100) == (100, 50)
    assert resized_size(400, 200, resize=100, max_side=150) == (150, 75)
    assert resized_size(40, 20, resize=100, max_side=None) == (40, 20)


def test_encode_image_handles_alpha_and_resizes() -> None:
    rgba = Image.new("RGBA", (64, 32), (0, 0, 255, 0))
    out = Image.open(io.BytesIO(encode_image(rgba, resize=16)))
    assert out.format == "JPEG" and out.mode == "RGB" and out.size == (32, 16)
    assert out.getpixel((5, 5))[0] > 240  # transparent -> white, not black


def write_images(root: Path) -> None:
    (root / "img").mkdir()
    Image.new("RGB", (40, 20), "red").save(root / "img" / "a.png")
    Image.new("RGB", (30, 30), "blue").save(root / "img" / "b.jpg")
    (root / "img" / "broken.jpg").write_bytes(b"not a jpeg")


def test_write_pair_shards_counts_unreadable_images(tmp_path: Path) -> None:
    write_images(tmp_path)
    records = [
        PairRecord("000", tmp_path / "img" / "a.png", "红色", {"lang": "zh"}),
        PairRecord("001", tmp_path / "img" / "broken.jpg", "坏图", {}),
        PairRecord("002", tmp_path / "img" / "missing.jpg", "缺图", {}),
        PairRecord("003", Image.new("RGB", (50, 10)), "内存图", {}),
    ]
    stats = write_pair_shards(records, tmp_path / "out", image_size=10, max_side=30)
    assert stats.samples == 2 and stats.failures == 2
    assert {f["key"] for f in stats.failed} == {"001", "002"}
    rows = list(wds.WebDataset(str(tmp_path / "out" / "00000.tar"), shardshuffle=False).decode("pil"))
    assert [r["jpg"].size for r in rows] == [(20, 10), (30, 6)]


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_read_pair_table_formats(tmp_path: Path, suffix: str) -> None:
    rows = [
        {"image": "img/a.png", "caption": "红色的方块", "source": "x"},
        {"image": "img/b.jpg", "caption": "蓝", "source": "y"},
    ]
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        sep = "\t" if suffix == ".tsv" else ","
        lines = [sep.join(rows[0])] + [sep.join(r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = list(read_pair_table(path))
    assert [r.key for r in records] == ["000000000", "000000001"]
    assert records[0].image == tmp_path / "img" / "a.png" and records[0].text == "红色的方块"
    assert records[1].meta == {"source": "y", "source_image": "img/b.jpg"}


def test_read_pair_table_refuses_urls(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("image\tcaption\nhttps://example.com/a.jpg\t猫\n", encoding="utf-8")
    with pytest.raises(ShardInputError, match=r"pairs.tsv:2: .*URL.*does not download"):
        list(read_pair_table(path))


def test_reading_groups_members_by_key_like_webdataset(tmp_path: Path) -> None:
    """The one shard iteration: the keys and member groups the webdataset library sees, headers-only
    counts that agree, a size limit that leaves a member unread, a damaged tail that ends reading."""
    with ShardWriter(tmp_path / "s", max_samples_per_shard=3) as writer:
        for i in range(5):
            writer.write(f"k{i}", jpeg(), f"第{i}张", {"i": i})
    shards = expand_shards(str(tmp_path / "s" / "{00000..00001}.tar"))
    assert shards == expand_shards(str(tmp_path / "s" / "*.tar"))
    ours = [(k, sorted(m)) for shard in shards for k, m in iter_tar_samples(shard)]
    theirs = [
        (s["__key__"], sorted(k for k in s if not k.startswith("__")))
        for s in wds.WebDataset([str(p) for p in shards], shardshuffle=False)
    ]
    assert ours == theirs == [(f"k{i}", ["jpg", "json", "txt"]) for i in range(5)]
    heads = [(k, exts) for shard in shards for k, exts, _ in iter_tar_member_names(shard)]
    assert heads == [(f"k{i}", {"jpg", "json", "txt"}) for i in range(5)]
    assert split_key("dir/a.b.JPG") == ("dir/a", "b.jpg")  # key up to the basename's first dot

    (key, members), *_ = iter_tar_samples(shards[0], max_sample_bytes=len(jpeg()) - 1)
    assert key == "k0" and isinstance(members["jpg"], UnreadMember)

    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(shards[0]).read_bytes()[:4000])  # ends inside k1's image data
    assert [(k, sorted(m)) for k, m in iter_tar_samples(str(cut))] == [("k0", ["jpg", "json", "txt"])]
    cut.write_bytes(Path(shards[0]).read_bytes()[:2600])  # ends inside k0's json data: tarfile sees an
    (key, members), *rest = iter_tar_samples(str(cut))  # end of archive, the sample lacks its json
    assert key == "k0" and "json" not in members and rest == []  # (check_sample rejects it)
