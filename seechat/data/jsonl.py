"""The one home of the JSONL format: one JSON value per line, UTF-8, non-ASCII written as is.

- `dumps_line(value)`: the line every writer emits (`json.dumps(..., ensure_ascii=False)` + "\\n").
- `enumerate_jsonl(path)`: (1-based line number, value) for every non-blank line; a line that is not
  JSON raises `JsonlError` naming the file and the line, or is handed to `on_error` and skipped.
- `iter_jsonl(path)` / `read_jsonl(path)`: the values alone, streamed or as a list.
- `write_jsonl(path, rows)`: crash-safe (`seechat.atomic.atomic_file`): a kill mid-write leaves the
  previous file whole, never a half-written one. `append_jsonl(path, rows)`: appends, for logs that
  grow a row at a time (a torn last line is the only possible damage, and readers report it).

Lines are split on "\\n" only, never with `str.splitlines`: JSON written with `ensure_ascii=False`
keeps U+2028 / U+2029 / U+0085 raw inside strings, and `splitlines` would cut such a row in two
(one of the two copies this module replaced did). What this module is not: JSON arrays or objects
spread over a file (`seechat.data.instruct` reads those formats) nor a schema checker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from seechat.atomic import atomic_file

PathLike = str | os.PathLike[str]


class JsonlError(ValueError):
    """A line of a JSONL file is not JSON; `path` and `line` (1-based) say where."""

    def __init__(self, path: PathLike, line: int, reason: str):
        super().__init__(f"{path}:{line}: invalid JSON ({reason})")
        self.path, self.line, self.reason = Path(path), line, reason


def dumps_line(value: Any) -> str:
    """One JSONL line: compact JSON, non-ASCII characters as they are, then a newline."""
    return json.dumps(value, ensure_ascii=False) + "\n"


def enumerate_jsonl(
    path: PathLike, on_error: Callable[[int, str, json.JSONDecodeError], None] | None = None
) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line, streamed. A line that is not JSON raises
    JsonlError, unless `on_error(line_number, line, error)` is given: then it is called and the
    line skipped (for readers that report bad rows instead of stopping)."""
    with open(path, encoding="utf-8", newline="\n") as f:  # "\n" only: see the module docstring
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                if on_error is None:
                    raise JsonlError(path, line_no, str(e)) from e
                on_error(line_no, line, e)
                continue
            yield line_no, value


def iter_jsonl(path: PathLike) -> Iterator[Any]:
    """Every value of a JSONL file, streamed (blank lines skipped; JsonlError on a bad line)."""
    for _, value in enumerate_jsonl(path):
        yield value


def read_jsonl(path: PathLike) -> list[Any]:
    """Every value of a JSONL file, as a list (blank lines skipped; JsonlError on a bad line)."""
    return list(iter_jsonl(path))


def write_jsonl(path: PathLike, rows: Iterable[Any]) -> int:
    """Replace `path` with one line per row, crash-safely (the folder is created); returns the count."""
    n = 0
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(dumps_line(row))
            n += 1
    return n


def append_jsonl(path: PathLike, rows: Iterable[Any]) -> int:
    """Append one line per row to `path` (created with its folder when missing); returns the count."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "a", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(dumps_line(row))
            n += 1
    return n
