"""`seechat data convert`: converts, and a bad record exits 2 naming it, leaving no output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from seechat.cli.data_convert import add_arguments as add_convert_arguments
from seechat.cli.data_convert import run as run_convert
from tests.data.test_instruct import LLAVA, write_json


def convert_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    return run_convert(parser.parse_args(list(argv)))


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_json(tmp_path / "llava.json", LLAVA[:2])
    out = tmp_path / "out.jsonl"
    assert convert_cli(str(src), str(out)) == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["000000033471", "7"]
    bad = write_json(tmp_path / "bad.json", [LLAVA[0], {"id": "b", "conversations": []}])
    assert convert_cli(str(bad), str(tmp_path / "bad.jsonl")) == 2
    assert "record 1 (id='b')" in capsys.readouterr().err
    assert not (tmp_path / "bad.jsonl").exists() and not (tmp_path / "bad.jsonl.tmp").exists()
