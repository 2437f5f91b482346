"""Crash-safe writes: a directory or a file is replaced only by a complete, synced new version.

Checkpoints, resume points, filtered shards, the mini world and the mini experts are directories
that must never be lost or seen half written. `atomic_directory(final)` builds the new version
beside the old one and swaps them:

    final              the current version
    .final.tmp-XXXX    the new version while it is written (never read)
    .final.old-XXXX    the previous version, set aside for the instant of the swap

1. the caller writes into `.tmp-`; sub-folders named in `keep` are hard-linked (copied where the
   file system has no links) from `final` into it, so the old version stays whole;
2. every file and folder of `.tmp-` is fsynced;
3. `final` is renamed to `.old-`, and the parent folder fsynced;
4. `.tmp-` is renamed to `final`, and the parent folder fsynced;
5. `.old-` is deleted.

A POSIX rename cannot replace a non-empty directory, hence the aside copy. At every instant a
complete version exists at `final` or, between steps 3 and 4, at `.old-`: a kill there loses
nothing. `recover(final)` puts the aside version back (every writer calls it before writing, and
the training loop before it looks for its resume point) and deletes what killed writers left;
readers that must not change the disk use `existing(final)`. One writer per path at a time.

`atomic_file(final)` is the same for one file (temp file, fsync, `os.replace`, fsync the folder:
a file can be replaced in one rename). `check_output_apart` refuses an output that would replace
or delete the input it is made from (`seechat export CK CK`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class OutputOverlapError(ValueError):
    """The output path is the input, inside it, or contains it: writing would destroy the input."""


def _siblings(final: Path, kind: str) -> list[Path]:
    """The `.final.tmp-*` or `.final.old-*` folders beside `final`."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.{kind}-[0-9a-f]{{8}}")
    if not final.parent.is_dir():
        return []
    return sorted(p for p in final.parent.iterdir() if pattern.fullmatch(p.name))


def existing(final: str | Path) -> Path:
    """Where the complete version of `final` is now: `final`, or the copy a writer killed between
    its two renames set aside (see the module docstring); `final` when there is neither. Read-only."""
    final = Path(final)
    if final.exists():
        return final
    aside = _siblings(final, "old")
    return max(aside, key=lambda p: p.stat().st_mtime_ns) if aside else final


def recover(final: str | Path) -> Path:
    """Repair what a killed writer left at `final`: put a set-aside version back when `final` is
    missing, delete unfinished new versions and old versions already replaced. Returns `final`."""
    final = Path(final)
    aside = _siblings(final, "old")
    if not final.exists() and aside:
        newest = max(aside, key=lambda p: p.stat().st_mtime_ns)
        log.warning("%s was being replaced when its writer stopped; restoring the previous version", final)
        os.rename(newest, final)
        _fsync_dir(final.parent)
        aside.remove(newest)
    for leftover in aside + _siblings(final, "tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


@contextmanager
def atomic_directory(final: str | Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `final`, on error it is removed.

    `keep`: sub-folders of an existing `final` carried over into the new one (a training run keeps
    its `train/` records beside the checkpoint it overwrites); the body must not write them."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for name in keep:
            if (final / name).exists():
                _link_tree(final / name, tmp / name)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # From here on no cleanup runs on an error: an exception leaves the disk as a kill would.
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        _fsync_dir(final.parent)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
        _fsync_dir(final.parent)


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success the file written there replaces `final`
    (fsynced first), on error it is removed. A kill leaves the previous `final` in place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def check_output_apart(source: str | Path, out: str | Path) -> None:
    """Refuse (OutputOverlapError) an `out` that is `source`, lies inside it or contains it: writing
    `out` replaces that directory, so the source would be replaced or deleted."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src:
        where = "is the source itself"
    elif dst.is_relative_to(src):
        where = "is inside the source"
    elif src.is_relative_to(dst):
        where = "contains the source"
    else:
        return
    raise OutputOverlapError(
        f"the output {out} {where} ({source}); writing it would replace the source. Choose an output "
        "directory outside the source"
    )


def _link_tree(src: Path, dst: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard link (no data copied, the old version keeps its own name for the file); copy where the
    file system has no hard links."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file under `root`, then every folder, deepest first."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and not os.path.islink(path):  # not a link, FIFO or socket
                _fsync_file(path)
        _fsync_dir(directory)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (creations, renames) durable. Not possible on Windows: skipped."""
    if os.name == "nt":
        return
    _fsync_file(path)
