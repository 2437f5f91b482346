"""The column-bucket benchmark's rehearsal: both ways timed on the same pool, buckets narrower."""

from __future__ import annotations

import json

from benchmarks.bench_static_columns import main


def test_tiny_rehearsal_times_both_ways(tmp_path):
    out = tmp_path / "res.json"
    args = ["--tiny", "--capacity", "1024", "--context", "100", "--batch", "1", "3", "--rounds", "1"]
    assert main([*args, "--steps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["attention"]) for r in rows] == [
        (b, a) for b in (1, 3) for a in ("whole slot", "column buckets")
    ]
    assert {r["columns"] for r in rows} == {1024, 256} and all(r["median_ms"] > 0 for r in rows)
