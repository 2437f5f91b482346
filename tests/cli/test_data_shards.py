"""`seechat data shards`: a table becomes shards with stats; image URLs exit 2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from seechat.cli.data_shards import add_arguments as add_shards_arguments
from seechat.cli.data_shards import run as run_shards
from tests.data.test_shards import write_images


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_shards_arguments(parser)
    return run_shards(parser.parse_args(list(argv)))


def test_cli_shards_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_images(tmp_path)
    table = tmp_path / "pairs.tsv"
    table.write_text(
        "url\ttext\tsim\nimg/a.png\t红\t0.3\nimg/broken.jpg\t坏\t0.1\nimg/b.jpg\t蓝\t0.2\n", encoding="utf-8"
    )
    out = tmp_path / "shards"
    code = cli(str(table), str(out), "--image-column", "url", "--caption-column", "text", "--resize", "8",
               "--samples-per-shard", "1", "--no-progress")  # fmt: skip
    assert code == 0
    summary = json.loads((out / "stats.json").read_text())
    assert summary["samples"] == 2 and summary["num_shards"] == 2 and summary["failures"] == 1
    assert "2 samples" in capsys.readouterr().out
    url_table = tmp_path / "urls.csv"
    url_table.write_text("image,caption\nhttp://x/a.jpg,猫\n", encoding="utf-8")
    assert cli(str(url_table), str(tmp_path / "o2"), "--no-progress") == 2
    assert "URL" in capsys.readouterr().err
