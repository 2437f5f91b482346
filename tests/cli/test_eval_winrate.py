"""`seechat eval winrate`: the options, the caption-file specs, the run and its exit codes."""

from __future__ import annotations

import argparse
from pathlib import Path

from seechat.cli.eval_winrate import _parse_caption_spec as parse_caption_spec
from seechat.cli.eval_winrate import add_arguments as add_winrate_arguments
from seechat.cli.eval_winrate import run as run_winrate_from_args


def test_cli_wiring(tiny_clip_dir, image_dir, caption_files, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="seechat eval winrate")
    add_winrate_arguments(parser)
    assert "--captions" in parser.format_help() and "FILE[=METHOD]" in parser.format_help()
    assert parse_caption_spec("out/a.jsonl=alt_text") == ("alt_text", Path("out/a.jsonl"))
    assert parse_caption_spec("out/stage1.jsonl") == ("stage1", Path("out/stage1.jsonl"))
    assert parse_caption_spec("runs/x=y/c.jsonl") == ("c", Path("runs/x=y/c.jsonl"))

    out = tmp_path / "cli"
    args = parser.parse_args(
        [
            "--images",
            str(image_dir),
            "--captions",
            f"{caption_files['alt_text']}=alt_text",
            str(caption_files["stage1"]),
            "--scorer",
            str(tiny_clip_dir),
            "--out",
            str(out),
            "--batch-size",
            "3",
            "--bootstrap",
            "50",
            "--seed",
            "1",
        ]
    )
    assert run_winrate_from_args(args) == 0
    printed = capsys.readouterr().out
    assert "alt_text" in printed and "stage1" in printed and (out / "report.md").is_file()

    missing = parser.parse_args(
        [
            "--images",
            str(image_dir),
            "--captions",
            str(tmp_path / "nope.jsonl"),
            "--scorer",
            str(tiny_clip_dir),
            "--out",
            str(out),
        ]
    )
    assert run_winrate_from_args(missing) == 2
    no_scorer = parser.parse_args(
        [
            "--images",
            str(image_dir),
            "--captions",
            str(caption_files["stage1"]),
            "--scorer",
            str(tmp_path / "no_such_model"),
            "--out",
            str(out),
        ]
    )
    assert run_winrate_from_args(no_scorer) == 2
