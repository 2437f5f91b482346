"""The drafts benchmark serves the val split of a world through every engine, one request at a
time, and checks each reply against transformers' greedy one."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_drafts
from seechat.config import BridgeConfig, LMConfig, ModelConfig, VisionConfig
from seechat.model import build, write_checkpoint


@pytest.fixture(scope="module")
def ckpt(tiny_world, tmp_path_factory):
    """An untrained mlp2x_gelu checkpoint on the tiny world's experts (read only here)."""
    cfg = ModelConfig(
        vision=VisionConfig(path=tiny_world["vision"]),
        lm=LMConfig(path=tiny_world["lm"], tokenizer_path=tiny_world["tokenizer"]),
        bridge=BridgeConfig(type="mlp2x_gelu"),
        max_length=256,
    )
    torch.manual_seed(0)
    return write_checkpoint(*build(cfg), tmp_path_factory.mktemp("bench_drafts") / "ckpt")


def test_serves_the_val_split_and_every_reply_equals_transformers(ckpt, tiny_world, tmp_path):
    out = tmp_path / "drafts.json"
    argv = ["--model", str(ckpt), "--world", tiny_world["world"], "--requests", "6", "--warmup", "2"]
    assert bench_drafts.main([*argv, "--max-new-tokens", "24", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["replies_equal"] == res["requests"] == 6 and res["replies_that_differ"] == []
    assert sum(n for _, n in res["replies_equal_by_kind"].values()) == 6  # every kind served
    engines = {"seechat", "seechat, drafts from the request only", "seechat, no speculation", "transformers"}
    assert engines <= set(res["results"]["all"]) and engines <= set(res["results"]["after 2"])
    assert all(cell["decode_tok_s"] > 0 for cell in res["results"]["all"].values())
    assert res["counters"]["seechat, no speculation"]["draft_tokens"] == 0
    assert res["counters"]["seechat, drafts from the request only"]["history_drafts"] == 0
    # transformers' own prompt lookup either ran (a column) or failed with its error recorded
    lookup = "transformers, prompt lookup"
    assert (lookup in res["results"]["all"]) != (lookup in res["failed"])


def test_sampled_run_times_every_side_without_comparing_replies(ckpt, tiny_world, tmp_path):
    out = tmp_path / "sampled.json"
    argv = ["--model", str(ckpt), "--world", tiny_world["world"], "--requests", "5", "--warmup", "1"]
    assert (
        bench_drafts.main([*argv, "--max-new-tokens", "16", "--temperature", "1.0", "--json", str(out)]) == 0
    )
    res = json.loads(out.read_text())
    assert res["temperature"] == 1.0 and res["replies_equal"] is None and res["requests"] == 5
    assert all(cell["end_to_end_tok_s"] > 0 for cell in res["results"]["all"].values())


def test_first_difference_is_where_a_reply_leaves_the_reference():
    assert bench_drafts.first_difference([1, 2, 3], [1, 2, 4]) == 2
    assert bench_drafts.first_difference([1, 2], [1, 2, 3]) == 2  # a prefix: where the shorter ends
    assert bench_drafts.first_difference([5], [1]) == 0


def test_a_reply_that_leaves_transformers_fails_the_run_unless_at_a_float_tie(
    ckpt, tiny_world, tmp_path, monkeypatch
):
    run = bench_drafts.Engines.run

    def one_engine_errs(self, name, ids, image):
        tokens, times, t0 = run(self, name, ids, image)
        if name == "seechat, no speculation" and len(tokens) > 3:
            tokens = [*tokens[:3], tokens[3] + 1, *tokens[4:]]  # its 4th token, changed
        return tokens, times, t0

    monkeypatch.setattr(bench_drafts.Engines, "run", one_engine_errs)
    argv = ["--model", str(ckpt), "--world", tiny_world["world"], "--requests", "2", "--warmup", "1"]
    out = tmp_path / "differ.json"
    assert bench_drafts.main([*argv, "--max-new-tokens", "8", "--json", str(out)]) == 1
    differ = json.loads(out.read_text())["replies_that_differ"]
    assert differ and all(d["first_difference"] == {"seechat, no speculation": 3} for d in differ)
    assert all(d["transformers_top2_margin"]["seechat, no speculation"] > 0 and not d["tie"] for d in differ)
    monkeypatch.setattr(bench_drafts, "TIE_MARGIN", float("inf"))  # every gap is a "tie": the run passes
    assert bench_drafts.main([*argv, "--max-new-tokens", "8", "--json", str(out)]) == 0
    assert all(d["tie"] for d in json.loads(out.read_text())["replies_that_differ"])
