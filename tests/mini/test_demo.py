"""CI-sized end to end: every stage of `seechat demo` on a small world, from the shipped experts."""

from __future__ import annotations

import json

import pytest

from seechat.mini.demo import demo
from seechat.mini.world import WorldConfig

WORLD = WorldConfig(n_train=300, n_val=16, n_test=40)
STAGES = {
    "stage1": ["train.max_steps=15", "train.batch_size=8", "train.log_every=1", "data.num_workers=0"],
    "stage2": ["train.max_steps=40", "train.batch_size=8", "train.log_every=1", "data.num_workers=0"],
}


@pytest.mark.slow
def test_demo_end_to_end_learns(tmp_path):
    results = demo(tmp_path / "run", world_cfg=WORLD, stage_extra=STAGES, eval_limit=40)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in (
        "wall_seconds",
        "vqa_accuracy",
        "vqa_accuracy_by_type",
        "vqa_accuracy_blind",
        "vqa_accuracy_blind_by_type",
        "grounding_acc_at_0.5",
        "detection_map_at_0.5",
        "detection_recall_by_class",
        "caption_winrate_vs_alt_text",
        "caption_cider_d",
    ):
        assert key in saved
    assert (tmp_path / "run" / "stage2" / "config.json").is_file()
    # Stage 2 learns: its loss over the last ten logged steps is well below the first logged one
    # (single logged steps are noisy: length-grouped batches mix task types unevenly).
    rows = [
        json.loads(r)
        for r in (tmp_path / "run" / "stage2" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    tail = [r["loss"] for r in rows[-10:]]
    assert sum(tail) / len(tail) < 0.8 * rows[0]["loss"]
    assert 0.0 <= results["vqa_accuracy"] <= 1.0 and results["vqa_questions"] == 40
    assert 0.0 <= results["detection_map_at_0.5"] <= 1.0 and results["detection_images"] == 40

    # Re-running reuses every finished step: nothing is trained again.
    marks = [tmp_path / "run" / s / "train" / "summary.json" for s in ("stage1", "stage2")]
    before = [m.stat().st_mtime_ns for m in marks]
    demo(tmp_path / "run", world_cfg=WORLD, stage_extra=STAGES, eval_limit=40)
    assert [m.stat().st_mtime_ns for m in marks] == before
