"""`seechat chat` end to end on a tiny checkpoint: the REPL's commands, and the verb reading stdin."""

from __future__ import annotations

import io

from seechat.cli import main
from seechat.cli.chat import _chat_loop
from seechat.infer.chat import ChatSession
from seechat.infer.engine import Engine
from seechat.infer.sampling import SamplingParams
from tests.infer.tiny_engine import coloured


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
        _chat_loop(chat, SamplingParams(max_new_tokens=6), [], [], io.StringIO(script), out)
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
