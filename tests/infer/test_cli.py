"""`seechat chat` and `seechat caption` end to end on a tiny checkpoint."""

from __future__ import annotations

import io
import json

import pytest

from seechat.cli import main
from seechat.eval.winrate import load_captions
from seechat.infer.caption_cli import caption
from seechat.infer.chat import ChatSession
from seechat.infer.chat_cli import chat_loop
from seechat.infer.engine import Engine
from seechat.infer.sampling import SamplingParams
from tests.infer.tiny_engine import coloured, png_bytes


def test_chat_loop_commands_and_multi_image(tiny, tmp_path):
    model, processor = tiny
    for i in range(2):
        coloured(i).save(tmp_path / f"{i}.png")
    script = (
        "\n".join(
            [
                "/help",
                f"/image {tmp_path / '0.png'}",
                "图里有什么？",
                "颜色呢？",
                f"/image {tmp_path / '1.png'}",
                "比较两张图",
                "/image missing.png",
                "/nonsense",
                "你好" * 300,
                "/clear",
                "你好",
                "/quit",
                "never read",
            ]
        )
        + "\n"
    )
    out = io.StringIO()
    with Engine(model, processor) as engine:
        chat = ChatSession(engine, processor)
        chat_loop(chat, SamplingParams(max_new_tokens=6), [], [], io.StringIO(script), out)
        assert engine.counters["images_encoded"] == 2
    text = out.getvalue()
    assert text.count("助手> ") == 5
    assert "error: the prompt is" in text and "context is 512 tokens" in text  # too long: said, not fatal
    assert (
        "/image PATH" in text and "missing.png: no such file" in text and "unknown command /nonsense" in text
    )
    assert "(new conversation)" in text
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]  # /clear, then one turn
    assert len(chat.images) == 0


def test_chat_verb_reads_stdin(tiny_ckpt, tmp_path, monkeypatch, capsys):
    coloured(0).save(tmp_path / "a.png")
    monkeypatch.setattr("sys.stdin", io.StringIO("图里有什么？\n"))
    assert (
        main(
            [
                "chat",
                "--model",
                str(tiny_ckpt["qwen2"]),
                "--image",
                str(tmp_path / "a.png"),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "1 image(s) attached" in out and "助手> " in out
    assert main(["chat", "--model", str(tiny_ckpt["qwen2"]), "--image", str(tmp_path / "nope.png")]) == 2


@pytest.fixture
def image_inputs(tmp_path):
    """The same four images as a folder, a .jsonl list, a .txt list and a webdataset shard."""
    import webdataset as wds

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    names = ["a.png", "b.png", "sub/c.png", "d.png"]
    for i, name in enumerate(names):
        coloured(i).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"image": f"imgs/{n}"}) + "\n" for n in names))
    (tmp_path / "list.txt").write_text("".join(f"imgs/{n}\n" for n in names))
    shard = tmp_path / "shard-00000.tar"
    with wds.TarWriter(str(shard)) as w:
        for i in range(4):
            w.write({"__key__": f"{i:05d}", "png": png_bytes(coloured(i)), "txt": "x"})
    return {
        "folder": folder,
        "jsonl": tmp_path / "list.jsonl",
        "txt": tmp_path / "list.txt",
        "shard": shard,
        "names": names,
    }


def test_caption_every_input_kind_gives_winrate_rows(tiny, image_inputs, tmp_path):
    model, processor = tiny
    params = SamplingParams(max_new_tokens=8)
    outs = {}
    with Engine(model, processor) as engine:
        for kind in ("folder", "jsonl", "txt", "shard"):
            out = tmp_path / f"{kind}.jsonl"
            counts = caption(
                engine, processor, [str(image_inputs[kind])], out, params=params, window=3, progress=False
            )
            captions, problems = load_captions(out, kind)
            assert not [p for p in problems if p.kind != "empty_caption"]
            outs[kind] = [json.loads(line) for line in out.read_text().splitlines()]
            assert counts["failed"] == (1 if kind == "folder" else 0)
    names = image_inputs["names"]
    assert [r["image"] for r in outs["folder"]] == sorted(names)
    assert [r["image"] for r in outs["jsonl"]] == [f"imgs/{n}" for n in names]
    assert [r["image"] for r in outs["txt"]] == [f"imgs/{n}" for n in names]
    assert [r["image"] for r in outs["shard"]] == [f"{i:05d}" for i in range(4)]
    # the same pixels give the same caption whatever the input kind (greedy)
    by_name = {r["image"]: r["caption"] for r in outs["folder"]}
    assert [r["caption"] for r in outs["shard"]] == [by_name[n] for n in names]


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
