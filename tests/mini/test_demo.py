"""CI-sized end to end: every stage of `seechat demo` on a small world, learning well above chance."""

from __future__ import annotations

import json

import pytest

from seechat.mini.demo import demo
from seechat.mini.experts import ClipRecipe, LMRecipe
from seechat.mini.world import WorldConfig

WORLD = WorldConfig(n_train=400, n_val=16, n_test=60)
CLIP = ClipRecipe(vision_hidden=64, vision_layers=2, text_hidden=64, text_layers=1, projection_dim=64,
                  steps=80, batch_size=32, warmup_steps=4, log_every=5)
LM = LMRecipe(hidden=64, layers=2, intermediate=128, seq_len=128, steps=150, batch_size=16, warmup_steps=5, log_every=5)
STAGES = {
    "stage1": ["train.max_steps=40", "train.batch_size=16", "train.log_every=5", "data.num_workers=0"],
    "stage2": ["train.max_steps=300", "train.batch_size=16", "train.log_every=5", "data.num_workers=0"],
}


@pytest.mark.slow
def test_demo_end_to_end_learns(tmp_path):
    results = demo(tmp_path / "run", world_cfg=WORLD, stage_extra=STAGES, eval_limit=60,
                   clip_recipe=CLIP, lm_recipe=LM)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("wall_seconds", "vqa_accuracy", "vqa_accuracy_by_type", "grounding_acc_at_0.5",
                "caption_winrate_vs_alt_text", "caption_cider_d"):
        assert key in saved
    assert (tmp_path / "run" / "stage2" / "config.json").is_file()
    # Stage 2 learns: its loss over the last ten logged steps is well below the first logged one
    # (single logged steps are noisy: length-grouped batches mix task types unevenly).
    rows = [json.loads(r) for r in (tmp_path / "run" / "stage2" / "train" / "metrics.jsonl").read_text().splitlines()]
    tail = [r["loss"] for r in rows[-10:]]
    assert sum(tail) / len(tail) < 0.8 * rows[0]["loss"]
    assert 0.0 <= results["vqa_accuracy"] <= 1.0 and results["vqa_questions"] == 60

    # Re-running reuses every finished step: nothing is trained again.
    marks = [tmp_path / "run" / s / "train" / "summary.json" for s in ("stage1", "stage2")]
    marks += [tmp_path / "run" / "experts" / e / "done.json" for e in ("clip", "lm")]
    before = [m.stat().st_mtime_ns for m in marks]
    demo(tmp_path / "run", world_cfg=WORLD, stage_extra=STAGES, eval_limit=60, clip_recipe=CLIP, lm_recipe=LM)
    assert [m.stat().st_mtime_ns for m in marks] == before

