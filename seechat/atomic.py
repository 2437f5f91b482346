"""Writing a directory atomically: build it under a temporary sibling name, then rename it in.

Checkpoints, resume points, the mini world and the mini experts are all directories that must
never be seen half written: a crash (or a kill) mid-write leaves the previous version in place.
A non-empty directory cannot be replaced by one rename, so an existing one is first renamed
aside and deleted after the new one is in place.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(final: str | Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `final`, on error it is removed.

    `keep`: sub-folders of an existing `final` carried over into the new one (a training run keeps
    its `train/` records beside the checkpoint it overwrites)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not final.exists():
        tmp.rename(final)
        return
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    final.rename(old)
    for name in keep:
        if (old / name).exists():
            (old / name).rename(tmp / name)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
