"""Crash-safe writes: a kill at any point of a replace leaves a complete version that the next
reader finds and the next writer restores; kept folders survive; outputs never replace inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seechat.atomic import (
    OutputOverlapError,
    atomic_directory,
    atomic_file,
    check_output_apart,
    existing,
    recover,
)

ROOT = Path(__file__).resolve().parents[1]
KILLED = 99  # the writer's exit status when it killed itself

# Replaces OUT (version v1, with train/ records) by v2, keeping train/. Every file-system call that
# the replace makes is counted; at call number KILL_AT the process dies on the spot (os._exit: no
# cleanup, no finally), as a SIGKILL would leave it.
WRITER = """
import os, sys
from pathlib import Path
from seechat.atomic import atomic_directory

out, kill_at = Path(sys.argv[1]), int(sys.argv[2])
calls = 0

def killing(fn):
    def call(*args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at:
            os._exit(99)
        return fn(*args, **kwargs)
    return call

for name in ("mkdir", "rename", "replace", "link", "fsync", "unlink", "rmdir"):
    setattr(os, name, killing(getattr(os, name)))
with atomic_directory(out, keep=("train",)) as d:
    (d / "weights.bin").write_text("v2")
    (d / "parts").mkdir()
    (d / "parts" / "config.json").write_text("v2")
print(calls)
"""


def write_version(out: Path, version: str, keep: tuple[str, ...] = ("train",)) -> None:
    with atomic_directory(out, keep=keep) as d:
        (d / "weights.bin").write_text(version)
        (d / "parts").mkdir()
        (d / "parts" / "config.json").write_text(version)


def complete_version(directory: Path) -> str:
    """The version a directory holds, checking that it is whole and that the kept records survived."""
    version = (directory / "weights.bin").read_text()
    assert (directory / "parts" / "config.json").read_text() == version, "a mix of two versions"
    assert (directory / "train" / "metrics.jsonl").read_text() == "log"
    assert (directory / "train" / "resume" / "state.json").read_text() == '{"step": 3}'
    return version


def run_writer(out: Path, kill_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", WRITER, str(out), str(kill_at)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def make_v1(base: Path) -> Path:
    out = base / "ckpt"
    write_version(out, "v1", keep=())
    (out / "train" / "resume").mkdir(parents=True)
    (out / "train" / "metrics.jsonl").write_text("log")
    (out / "train" / "resume" / "state.json").write_text('{"step": 3}')
    return out


def test_a_kill_at_every_point_of_a_replace_loses_nothing(tmp_path):
    outcomes = []
    for kill_at in range(1, 200):
        base = tmp_path / f"k{kill_at}"
        out = make_v1(base)
        proc = run_writer(out, kill_at)
        if proc.returncode == 0:  # the writer made fewer calls than kill_at: every point was tried
            assert complete_version(out) == "v2"
            assert sorted(p.name for p in base.iterdir()) == ["ckpt"]
            break
        assert proc.returncode == KILLED, proc.stderr
        found = existing(out)  # what a reader sees, touching nothing
        version = complete_version(found)
        outcomes.append((version, found == out))
        assert recover(out) == out  # what the next writer / training start does
        assert complete_version(out) == version
        assert sorted(p.name for p in base.iterdir()) == ["ckpt"]  # leftovers cleaned
        write_version(out, "v3")  # and the next write works
        assert complete_version(out) == "v3"
    else:
        pytest.fail("the writer was never allowed to finish")
    assert len(outcomes) >= 10, outcomes
    assert ("v1", False) in outcomes  # killed between the two renames: `ckpt` missing, nothing lost
    assert {v for v, _ in outcomes} == {"v1", "v2"}


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
        (d / "train").mkdir()
    with pytest.raises(RuntimeError), atomic_directory(out, keep=("train",)) as d:
        (d / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "good" and (out / "train").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_file_replaces_only_when_complete(tmp_path):
    path = tmp_path / "rows.jsonl"
    with atomic_file(path) as tmp:
        tmp.write_text("one\n")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_output_that_would_replace_its_source_is_refused(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    for out, why in (
        (src, "is the source itself"),
        (src / "sub", "is inside the source"),
        (tmp_path, "contains the source"),
        (tmp_path / "x" / ".." / "ckpt", "is the source itself"),
    ):
        with pytest.raises(OutputOverlapError, match=why):
            check_output_apart(src, out)
    check_output_apart(src, tmp_path / "ckpt-export")  # a sibling with a common prefix is fine
