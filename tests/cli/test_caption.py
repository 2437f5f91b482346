"""`seechat caption` end to end on a tiny checkpoint: resume, single files, a bad input exits 2."""

from __future__ import annotations

import json

from seechat.cli import main


def test_caption_verb_resume_and_files(tiny_ckpt, image_inputs, tmp_path, capsys):
    out = tmp_path / "caps.jsonl"
    files = [str(image_inputs["folder"] / n) for n in image_inputs["names"][:2]]
    args = [
        "caption",
        "--model",
        str(tiny_ckpt["qwen2"]),
        *files,
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--no-progress",
    ]
    assert main(args) == 0
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == files
    more = str(image_inputs["folder"] / image_inputs["names"][2])
    assert main([*args[:3], *files, more, *args[3 + len(files) :], "--resume"]) == 0
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == [*files, more]
    assert "(2 already there)" in capsys.readouterr().out
    assert (
        main(
            ["caption", "--model", str(tiny_ckpt["qwen2"]), str(tmp_path / "nothing.bin"), "--out", str(out)]
        )
        == 2
    )
