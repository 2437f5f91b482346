"""The GPU serving benchmark's rehearsal: the same script with tiny shapes, on whatever device
the test machine has. It builds both sides on shared modules and their greedy tokens agree."""

from __future__ import annotations

import json

from benchmarks.bench_gpu_serving import main


def test_tiny_rehearsal_runs_and_both_sides_agree(tmp_path):
    out = tmp_path / "res.json"
    args = ["--tiny", "--new-tokens", "8", "--repeats", "1", "--concurrency", "1", "3", "--json", str(out)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["decode_paths"]["seechat"].startswith("static")
    assert res["greedy_tokens_shared"] == {name: [8, 8] for name in res["decode_paths"]}
    assert set(res["table"]) == {"seechat", "seechat, no static decode", "transformers"}
    for row in res["table"].values():
        assert row["decode_tok_s_b1"]["median"] > 0 and row["ttft_ms"]["median"] > 0
        assert set(row["agg_tok_s"]) == {"1", "3"}
    assert res["decode_weight_bytes"] > 0 and res["prompt_tokens"] > 16
