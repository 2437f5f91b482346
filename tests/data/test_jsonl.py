"""The JSONL home: round trip, line splitting on "\\n" only, errors that name the line, crash-safe writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from seechat.data.jsonl import (
    JsonlError,
    append_jsonl,
    dumps_line,
    enumerate_jsonl,
    iter_jsonl,
    read_jsonl,
    write_jsonl,
)


def test_round_trip_keeps_chinese_and_skips_blank_lines(tmp_path: Path) -> None:
    rows = [{"caption": "一个红色的圆", "n": 1}, {"caption": "two", "box": [1, 2, 3, 4]}, [1, "x"], "s"]
    path = tmp_path / "sub" / "rows.jsonl"
    assert write_jsonl(path, rows) == 4
    text = path.read_text(encoding="utf-8")
    assert "一个红色的圆" in text and text.count("\n") == 4  # non-ASCII as is, one line per row
    path.write_text(text.replace("\n", "\n\n  \n", 1), encoding="utf-8")
    assert read_jsonl(path) == rows
    assert list(iter_jsonl(path)) == rows
    assert [n for n, _ in enumerate_jsonl(path)] == [1, 4, 5, 6]  # 1-based, blank lines counted


def test_unicode_line_separators_inside_strings_do_not_split_rows(tmp_path: Path) -> None:
    """ensure_ascii=False keeps U+2028 raw; `str.splitlines` would cut the row there."""
    rows = [{"text": "前\u2028后\u2029再\x85完"}, {"text": "\x0c\x1c"}]
    path = tmp_path / "sep.jsonl"
    write_jsonl(path, rows)
    assert len(path.read_text(encoding="utf-8").splitlines()) > 2  # the trap the reader avoids
    assert read_jsonl(path) == rows


def test_crlf_files_read(tmp_path: Path) -> None:
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"a": 1}\r\n{"a": 2}\r\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_bad_line_raises_with_its_place_or_goes_to_on_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(JsonlError, match=r"bad\.jsonl:2: invalid JSON") as info:
        read_jsonl(path)
    assert info.value.line == 2 and info.value.path == path
    seen = []
    rows = list(enumerate_jsonl(path, on_error=lambda n, line, e: seen.append((n, line.strip()))))
    assert rows == [(1, {"a": 1}), (3, {"a": 3})] and seen == [(2, '{"a":')]


def test_write_is_crash_safe(tmp_path: Path) -> None:
    """A writer that fails half-way leaves the previous file whole and no temp file behind."""
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"v": 1}])

    def rows():
        yield {"v": 2}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert read_jsonl(path) == [{"v": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_append_grows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "log" / "skips.jsonl"
    append_jsonl(path, [{"k": "a"}])
    append_jsonl(path, [{"k": "b"}, {"k": "c"}])
    assert [r["k"] for r in read_jsonl(path)] == ["a", "b", "c"]
    assert dumps_line({"k": "图"}) == '{"k": "图"}\n'
