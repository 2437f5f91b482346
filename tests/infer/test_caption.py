"""`seechat.infer.caption.caption`: every input kind gives the rows the win-rate experiment reads."""

from __future__ import annotations

import json

from seechat.eval.winrate import load_captions
from seechat.infer.caption import caption
from seechat.infer.engine import Engine
from seechat.infer.sampling import SamplingParams


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
