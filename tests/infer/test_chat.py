"""One chat class over either backend: the engine and the model give the same greedy turns; stop
strings, history and images behave the same."""

from __future__ import annotations

from seechat.infer.chat import ChatSession, prompt_ids
from seechat.infer.engine import Engine, EngineConfig
from seechat.infer.generate import generate
from seechat.infer.sampling import SamplingParams
from tests.infer.tiny_engine import coloured

GREEDY = SamplingParams(max_new_tokens=12)
TURNS = [("图里有什么？", [coloured(0)]), ("是什么颜色？", []), ("这张呢？", [coloured(1)])]


def test_engine_and_model_backends_give_the_same_conversation(tiny):
    model, processor = tiny
    direct = ChatSession(model, processor, system="你是助手")
    replies = [direct.ask(q, imgs, GREEDY) for q, imgs in TURNS]
    assert direct.last is not None and direct.last.finish_reason in ("stop", "length")
    with Engine(model, processor, EngineConfig(speculative_tokens=0)) as engine:
        served = ChatSession(engine, processor, system="你是助手")
        assert [served.ask(q, imgs, GREEDY) for q, imgs in TURNS] == replies
        assert served.messages == direct.messages and len(served.images) == len(direct.images) == 2
    # and the first turn is exactly what the plain batch generator decodes from the same prompt
    first = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "<image>\n图里有什么？"}]
    ids = prompt_ids(processor, first, 1)
    pixels = processor.preprocess_images([coloured(0)])
    (new,) = generate(model, ids[None], None, pixels, GREEDY, processor.stop_token_ids)
    assert replies[0] == processor.decode(new)


def test_stop_strings_and_streamed_pieces_on_the_model_backend(tiny):
    model, processor = tiny
    long = SamplingParams(max_new_tokens=24)
    full = ChatSession(model, processor).ask("图里有什么？", [coloured(2)], long)
    assert len(full) >= 3
    stop = full[2:4]
    chat = ChatSession(model, processor)
    pieces = list(chat.stream("图里有什么？", [coloured(2)], long, stop=[stop]))
    assert "".join(pieces) == full[: full.index(stop)]  # cut before the stop string, never shown
    assert chat.last.finish_reason == "stop" and chat.messages[-1]["content"] == "".join(pieces)
    with Engine(model, processor) as engine:  # the engine cuts at the same place
        assert ChatSession(engine, processor).ask("图里有什么？", [coloured(2)], long, [stop]) == "".join(
            pieces
        )


def test_closing_the_stream_keeps_the_partial_reply_and_clear_forgets(tiny):
    model, processor = tiny
    chat = ChatSession(model, processor)
    stream = chat.stream("图里有什么？", [coloured(3)], SamplingParams(max_new_tokens=24))
    first = next(stream)
    stream.close()
    assert chat.messages[-1] == {"role": "assistant", "content": first}
    assert len(chat.images) == 1
    chat.clear()
    assert chat.messages == [] and chat.images == [] and chat.last is None
