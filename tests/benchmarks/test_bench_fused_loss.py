"""The fused-loss benchmark's rehearsal: the plain path and the fused one at two chunk sizes on the
same inputs, each row in a fresh process on a CPU, the same loss, and the rows written to --json."""

from __future__ import annotations

import json

from benchmarks.bench_fused_loss import main
from seechat.model import fused_loss


def test_rehearsal_runs_every_path_in_its_own_process(tmp_path):
    out = tmp_path / "res.json"
    args = ["--device", "cpu", "--tokens", "200", "--hidden", "32", "--vocab", "3000", "--chunks", "14", "25"]
    rows = main([*args, "--json", str(out)])
    assert [r["path"] for r in rows] == ["plain", "fused:14", "fused:25"]
    assert [r["chunk_tokens"] for r in rows] == [None, 5, 11184]  # 2^14 logits of 3000: 40 chunks of 5
    assert all(abs(r["loss"] - rows[0]["loss"]) < 1e-4 for r in rows)
    assert all(r["extra_memory_gib"] >= 0 and r["step_s"] > 0 for r in rows)
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["info"]["shape"]["vocab"] == 3000


def test_a_row_in_this_process_leaves_the_library_chunk_size_as_it_was(capsys):
    # on a GPU the rows run in one process: a row's chunk size must not outlive it
    library_chunk = fused_loss.CHUNK_ELEMENTS
    main(["--one", "fused:12", "64", "--device", "cpu", "--hidden", "16", "--vocab", "500"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["chunk_tokens"] == 8  # 2^12 logits of 500 per chunk, while the row ran
    assert fused_loss.CHUNK_ELEMENTS == library_chunk
