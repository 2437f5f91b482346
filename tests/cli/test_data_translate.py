"""`seechat data translate` with a tiny real Marian model."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from seechat.cli.data_translate import add_arguments as add_translate_arguments
from seechat.cli.data_translate import run as run_translate


def test_cli_translate(
    tmp_path: Path, source: Path, tiny_marian: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_translate_arguments(parser)
    out = tmp_path / "zh.jsonl"
    args = parser.parse_args(
        [str(source), str(out), "--model", str(tiny_marian), "--max-new-tokens", "4", "--no-progress"]
    )
    assert run_translate(args) == 0
    assert (tmp_path / "zh.jsonl.cache.sqlite").exists() and (tmp_path / "zh.flagged.jsonl").exists()
    assert "3 conversations" in capsys.readouterr().out
