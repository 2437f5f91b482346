"""atomic_directory: the new version replaces the old only when complete; kept folders survive."""

from __future__ import annotations

import pytest

from seechat.atomic import atomic_directory


def test_replaces_and_keeps_named_folders(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_directory(out) as d:
        (d / "a.txt").write_text("v1")
        (d / "train").mkdir()
        (d / "train" / "metrics.jsonl").write_text("log")
    with atomic_directory(out, keep=("train",)) as d:
        (d / "a.txt").write_text("v2")
    assert (out / "a.txt").read_text() == "v2"
    assert (out / "train" / "metrics.jsonl").read_text() == "log"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_error_mid_write_leaves_previous_version(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_directory(out) as d:
        (d / "a.txt").write_text("good")
    with pytest.raises(RuntimeError), atomic_directory(out, keep=("train",)) as d:
        (d / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
