"""The engine-host benchmark's rehearsal: both rows measured on a tiny checkpoint, steady state only."""

from __future__ import annotations

import json

from benchmarks.bench_decode_host import main
from tests.infer.tiny_engine import write_tiny_checkpoint


def test_rehearsal_times_the_engine_with_and_without_the_model_step(experts, tmp_path):
    ckpt = write_tiny_checkpoint(experts, tmp_path / "ckpt")
    out = tmp_path / "res.json"
    args = ["--model", str(ckpt), "--new-tokens", "12", "--repeats", "1", "--concurrency", "1", "3"]
    assert main([*args, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["decode_path"] == "static"
    assert set(res["table"]) == {"engine + model step", "engine alone"}
    for row in res["table"].values():
        assert set(row) == {"1", "3"} and all(0 < v["min_ms"] <= v["median_ms"] for v in row.values())
