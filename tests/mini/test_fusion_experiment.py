"""`seechat experiment fusion` end to end on a tiny world: four stage-2 modes from one stage 1,
every metric present, and the frozen-LM modes' text-only reading exactly the base LM's."""

from __future__ import annotations

import json

from seechat.mini.fusion_experiment import MODES, fusion_experiment
from tests.eval.conftest import tiny_clip_dir  # noqa: F401  (fixture: a tiny random ChineseCLIPModel)
from tests.mini.test_experiments import opts  # noqa: F401  (fixture: tiny world, 2-step recipes)


def test_fusion_experiment_compares_four_modes_and_measures_forgetting(opts, tmp_path):  # noqa: F811
    res = fusion_experiment(opts, tmp_path / "fusion", seeds=(0,), text_limit=3)
    assert (
        set(res["mean"])
        == set(MODES)
        == {
            "shallow_lm_full",
            "shallow_lm_frozen",
            "shallow_lm_lora",
            "deep_lm_frozen",
        }
    )
    models = res["per_seed"]["0"]["models"]
    for mode, m in res["mean"].items():
        for key in ("vqa_accuracy", "grounding_acc_at_0.5", "detection_map_at_0.5", "caption_winrate"):
            assert 0.0 <= m[key] <= 1.0, (mode, key)
        assert models[mode]["detection_images"] == 6
    before = res["text_reading_before"]
    assert before["n_qa"] > 3
    for mode in ("shallow_lm_frozen", "deep_lm_frozen"):  # the superset guarantee, measured
        assert models[mode]["text_reading"] == before
    assert models["shallow_lm_full"]["text_reading"]["qa_answer_ppl"] != before["qa_answer_ppl"]
    parts = {
        mode: json.loads((tmp_path / "fusion" / "seed0" / mode / "config.json").read_text()) for mode in MODES
    }
    assert parts["deep_lm_frozen"]["model"]["fusion"] == "deep"
    assert (tmp_path / "fusion" / "seed0" / "deep_lm_frozen" / "visual_experts.safetensors").is_file()
    assert (
        parts["shallow_lm_lora"]["parts"]["lm"] == "lora"
        and parts["shallow_lm_full"]["parts"]["lm"] == "full"
    )
    table = (tmp_path / "fusion" / "report.md").read_text(encoding="utf-8")
    assert all(f"| {mode} |" in table for mode in MODES) and "det mAP" in table

    # run again: every stage and every evaluation is reused, the numbers are the same
    evals = sorted((tmp_path / "fusion" / "seed0" / "evals").glob("*.json"))
    assert len(evals) == 4
    stamps = [p.stat().st_mtime_ns for p in evals]
    again = fusion_experiment(opts, tmp_path / "fusion", seeds=(0,), text_limit=3)
    assert again["mean"] == res["mean"] and [p.stat().st_mtime_ns for p in evals] == stamps
