"""PairShardDataset: exactly-once epochs, exact resume, rank split, corrupt-sample skipping."""

from __future__ import annotations

import io
import json
import math
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from seechat.data.pairs import PairShardDataset, ResumeSchedule, resume_schedule
from seechat.data.shards import ShardWriter, expand_shards

N_SHARDS, PER_SHARD = 5, 7


def jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), (seed * 37 % 256, seed * 11 % 256, 90)).save(out, "JPEG")
    return out.getvalue()


def keys_of(batch: list[dict]) -> list[str]:
    return [sample["key"] for sample in batch]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pairs")
    with ShardWriter(out, max_samples_per_shard=PER_SHARD) as writer:
        for s in range(N_SHARDS):
            for i in range(PER_SHARD):
                writer.write(f"s{s}i{i}", jpeg(s * PER_SHARD + i), f"图 {s} {i}", {"caption": f"c{s}{i}"})
    return out


ALL_KEYS = {f"s{s}i{i}" for s in range(N_SHARDS) for i in range(PER_SHARD)}


def run(dataset: PairShardDataset, num_workers: int, batch_size: int = 4) -> list[list[str]]:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=keys_of)
    return list(loader)


def dataset(shard_dir: Path, **kwargs) -> PairShardDataset:
    kwargs.setdefault("shuffle_buffer", 5)
    return PairShardDataset(str(shard_dir / "{00000..00004}.tar"), seed=3, **kwargs)


def test_yields_rgb_images_text_and_meta(shard_dir: Path) -> None:
    sample = next(iter(dataset(shard_dir, shuffle_buffer=0, shuffle_shards=False)))
    assert sample["key"] == "s0i0" and sample["text"] == "图 0 0"
    assert sample["image"].mode == "RGB" and sample["image"].size == (8, 6)
    assert sample["meta"]["caption"] == "c00"
    by_json = next(
        iter(dataset(shard_dir, shuffle_buffer=0, shuffle_shards=False, text_field="json:caption"))
    )
    assert by_json["text"] == "c00"


@pytest.mark.parametrize("num_workers", [1, 2])
def test_every_sample_exactly_once_per_epoch(shard_dir: Path, num_workers: int) -> None:
    ds = dataset(shard_dir)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        keys = [k for batch in run(ds, num_workers) for k in batch]
        assert sorted(keys) == sorted(ALL_KEYS)


def test_epochs_differ_but_are_reproducible(shard_dir: Path) -> None:
    ds = dataset(shard_dir)
    first = run(ds, 0)
    ds.set_epoch(1)
    second = run(ds, 0)
    assert first != second
    ds.set_epoch(0)
    assert run(ds, 0) == first


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_remaining_batches(shard_dir: Path, num_workers: int) -> None:
    full = run(dataset(shard_dir), num_workers)
    # 2 workers: 3 shards (6 batches) vs 2 shards (4 batches) -> batches 8.. come from worker 0 only.
    for k in (1, 3, 8, 9, len(full)):
        resumed = dataset(shard_dir)
        resumed.set_resume(epoch=0, batches_consumed=k, batch_size=4)
        assert run(resumed, num_workers) == full[k:], f"resume at batch {k}"


SMALL_LIMIT = 4096  # bytes per sample in the holey shards: s3i2 and s0i6 are larger


@pytest.fixture(scope="module")
def holey_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same layout with samples missing a member or too large (skipped before the shuffle buffer)."""
    out = tmp_path_factory.mktemp("holey")
    for s in range(N_SHARDS):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                key = f"s{s}i{i}"
                if key not in ("s1i3", "s4i0"):
                    add(tar, f"{key}.jpg", jpeg(i))
                if key != "s2i5":
                    add(tar, f"{key}.txt", key.encode())
                if key in ("s3i2", "s0i6"):
                    add(tar, f"{key}.json", json.dumps({"pad": "x" * SMALL_LIMIT}).encode())
    return out


def test_resume_is_exact_around_skipped_samples(holey_dir: Path) -> None:
    full = run(dataset(holey_dir, max_sample_bytes=SMALL_LIMIT), 2, batch_size=3)
    assert sum(map(len, full)) == len(ALL_KEYS) - 5
    for k in range(1, len(full) + 1):
        resumed = dataset(holey_dir, max_sample_bytes=SMALL_LIMIT)
        resumed.set_resume(epoch=0, batches_consumed=k, batch_size=3)
        assert run(resumed, 2, batch_size=3) == full[k:], f"resume at batch {k}"


def test_resume_in_a_later_epoch_via_state_dict(shard_dir: Path) -> None:
    ds = dataset(shard_dir)
    ds.set_epoch(2)
    full = run(ds, 0, batch_size=3)
    state = ds.state_dict(batches_consumed=5, batch_size=3)
    resumed = dataset(shard_dir)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.epoch == 2
    assert run(resumed, 0, batch_size=3) == full[5:]
    resumed.set_epoch(3)  # the resume point belongs to epoch 2 only
    assert sum(map(len, run(resumed, 0, batch_size=3))) == len(ALL_KEYS)


def test_resume_does_not_decode_skipped_images(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import seechat.data.pairs as pairs

    decoded: list[int] = []
    real = pairs.decode_rgb
    monkeypatch.setattr(pairs, "decode_rgb", lambda data: decoded.append(1) or real(data))
    ds = dataset(shard_dir)
    ds.set_resume(0, batches_consumed=6, batch_size=4)
    remaining = sum(map(len, run(ds, 0)))
    assert len(decoded) == remaining == len(ALL_KEYS) - 24


@pytest.mark.parametrize("pattern", ["{00000..00004}.tar", "0000[0-4].tar"])
def test_rank_split_covers_all_samples_without_overlap(shard_dir: Path, pattern: str) -> None:
    seen = []
    for rank in (0, 1):
        ds = PairShardDataset(str(shard_dir / pattern), rank=rank, world_size=2, seed=1)
        seen.append([s["key"] for s in ds])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(ALL_KEYS)


def test_fewer_shards_than_consumers_splits_by_sample(shard_dir: Path) -> None:
    shard = str(shard_dir / "00000.tar")
    seen = []
    for rank in (0, 1):
        ds = PairShardDataset(shard, rank=rank, world_size=2, shuffle_buffer=0)
        seen.append([k for batch in run(ds, 2, batch_size=2) for k in batch])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"s0i{i}" for i in range(PER_SHARD))


def add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_corrupt_samples_are_skipped_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "00000.tar"
    good = jpeg(1)
    with tarfile.open(path, "w") as tar:
        for key, members in {
            "ok1": {"jpg": good, "txt": b"a", "json": b"{}"},
            "garbage": {"jpg": b"not an image", "txt": b"b", "json": b"{}"},
            "truncated": {"jpg": good[: len(good) // 2], "txt": b"c", "json": b"{}"},
            "notext": {"jpg": good, "json": b"{}"},
            "badjson": {"jpg": good, "txt": b"d", "json": b"{oops"},
            "noimage": {"txt": b"e", "json": b"{}"},
            "ok2": {"png": _png(), "txt": b"f", "json": b'{"x": 1}'},
        }.items():
            for ext, payload in members.items():
                add(tar, f"{key}.{ext}", payload)
    log_dir = tmp_path / "skips"
    ds = PairShardDataset(str(path), shuffle_buffer=0, skip_log_dir=log_dir)
    with caplog.at_level("WARNING"):
        keys = [k for batch in run(ds, 2, batch_size=2) for k in batch]
    assert keys == ["ok1", "ok2"]
    report = ds.skipped  # gathered from the worker processes' logs
    assert report.count == 5
    assert sorted(report.keys) == ["badjson", "garbage", "noimage", "notext", "truncated"]
    assert "5 corrupt samples" in report.summary()
    in_process = PairShardDataset(str(path), shuffle_buffer=0)
    with caplog.at_level("WARNING"):
        assert [s["key"] for s in in_process] == ["ok1", "ok2"]
    assert in_process.skipped.count == 5
    assert "truncated" in caplog.text


class Zeros:
    """A file object of `size` zero bytes that never holds them all."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def test_a_gzip_bomb_member_is_skipped_without_being_read(tmp_path: Path) -> None:
    """A .tar.gz of ~50 KB whose image member inflates to 48 MiB. It used to be read whole into
    memory (a bigger one runs a loader out of memory); now it is skipped and counted unread."""
    path = tmp_path / "00000.tar.gz"
    huge = 48 << 20
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        add(tar, "ok1.jpg", jpeg(1))
        add(tar, "ok1.txt", b"a")
        info = tarfile.TarInfo("bomb.jpg")
        info.size = huge
        tar.addfile(info, Zeros(huge))
        add(tar, "bomb.txt", b"b")
        add(tar, "ok2.jpg", jpeg(2))
        add(tar, "ok2.txt", b"c")
    assert path.stat().st_size < 1 << 20
    ds = PairShardDataset(str(path), shuffle_buffer=0, max_sample_bytes=1 << 20)
    tracemalloc.start()
    try:
        keys = [s["key"] for s in ds]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert keys == ["ok1", "ok2"]
    assert peak < 8 << 20, f"{peak:,} bytes held while reading"
    assert ds.skipped.keys == ["bomb"] and "sample too large" in ds.skipped.summary()
    assert dict(ds.skipped.by_reason) == {"sample too large": 1}


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (4, 4), (1, 2, 3, 128)).save(out, "PNG")
    return out.getvalue()


def test_resume_schedule_round_robin_with_exhaustion() -> None:
    inf = math.inf
    assert resume_schedule([inf, inf], 5) == ResumeSchedule((3, 2), 1)
    assert resume_schedule([inf, inf, inf], 6) == ResumeSchedule((2, 2, 2), 0)
    # worker 1 has 1 batch: order w0 w1 w0 w0 w0 ...
    assert resume_schedule([10, 1], 4) == ResumeSchedule((3, 1), 0)
    # order: w0 w1 w2 | w0 w1 w2 | w1 w2 | w1 | ...
    assert resume_schedule([2, 5, 3], 7) == ResumeSchedule((2, 3, 2), 2)
    assert resume_schedule([2, 5, 3], 9) == ResumeSchedule((2, 4, 3), 1)
    assert resume_schedule([1], 7) == ResumeSchedule((1,), 0)


def test_expand_shards_errors_on_no_match(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        expand_shards(str(tmp_path / "*.tar"))
