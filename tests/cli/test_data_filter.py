"""`seechat data filter`: every option explained; end to end; existing output and bad options exit 2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from seechat.cli import main
from seechat.cli.data_filter import add_arguments as add_filter_arguments
from seechat.data.filter import STATS_FILE
from tests.data.test_filter import read_wds, scores_rows, shards_of


def test_help_explains_every_option() -> None:
    parser = argparse.ArgumentParser()
    add_filter_arguments(parser)
    assert parser.description
    for action in parser._actions:
        assert action.help, f"{action.dest} has no help"


def test_cli_end_to_end(shard_dir: Path, tiny_clip_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "filtered"
    args = ["data", "filter", shards_of(shard_dir), str(out), "--model", str(tiny_clip_dir),
            "--top-fraction", "0.5", "--batch-size", "3", "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "kept 5 of 10 scored pairs" in capsys.readouterr().out
    assert len(read_wds(out)) == 5 and len(scores_rows(out)) == 12
    assert json.loads((out / STATS_FILE).read_text())["rule"] == {"top_fraction": 0.5}

    assert main(args) == 2  # exists: refused without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--prefix", "f-"]) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["f-00000.tar"]  # replaced, not mixed

    base = ["data", "filter", shards_of(shard_dir), str(tmp_path / "x"), "--model", str(tiny_clip_dir)]
    for extra in ([], ["--threshold", "0.1", "--top-fraction", "0.5"], ["--top-fraction", "2"]):
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        assert exc.value.code == 2
    assert main([*base, "--threshold", "0.1", "--text-field", "caption"]) == 2
    assert "--text-field" in capsys.readouterr().err
