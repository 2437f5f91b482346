"""The fused-loss benchmark's rehearsal: both paths on the same inputs, each row in a fresh process
on a CPU, the same loss, and the rows written to --json."""

from __future__ import annotations

import json

from benchmarks.bench_fused_loss import main


def test_rehearsal_runs_both_paths_in_their_own_processes(tmp_path):
    out = tmp_path / "res.json"
    rows = main(
        ["--device", "cpu", "--tokens", "200", "--hidden", "32", "--vocab", "3000", "--json", str(out)]
    )
    assert [r["path"] for r in rows] == ["plain", "fused"]
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-4
    assert all(r["extra_memory_gib"] >= 0 and r["step_s"] > 0 for r in rows)
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["info"]["shape"]["vocab"] == 3000
