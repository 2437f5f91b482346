"""The seed win-rate experiment and the data-quality experiment, end to end on a tiny world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seechat.mini.demo import Assets
from seechat.mini.experiments import BRIDGE_NAMES, Options, data_quality_experiment, seed_experiment
from tests.eval.conftest import tiny_clip_dir  # noqa: F401  (fixture: a tiny random ChineseCLIPModel)

TINY = (
    "model.bridge.num_heads=2",
    "model.bridge.num_queries=8",
    "train.batch_size=4",
    "train.max_steps=2",
    "train.log_every=1",
    "data.num_workers=0",
    "optim.warmup_steps=1",
)


@pytest.fixture
def opts(tiny_world, tiny_clip_dir) -> Options:  # noqa: F811
    w = tiny_world
    assets = Assets(
        Path(w["world"]), Path(w["vision"]), Path(w["lm"]), Path(w["tokenizer"]), Path(tiny_clip_dir)
    )
    return Options(
        assets,
        limit=6,
        stage_extra=(("stage1", TINY), ("stage2", TINY)),
        device="cpu",
        batch_size=4,
        n_bootstrap=20,
    )


def test_seed_experiment_scores_seven_methods(opts, tmp_path):
    res = seed_experiment(opts, tmp_path / "seed")
    methods = {"alt_text", "blind_lm", "stage1_only", *(f"stage2_{b}" for b in BRIDGE_NAMES)}
    assert set(res["methods"]) == methods and res["images"] == 6
    assert sum(m["win_rate"] for m in res["methods"].values()) == pytest.approx(1.0)
    for m in methods:  # one caption per image, each method scored on its own captions
        rows = (
            (tmp_path / "seed" / "winrate" / "captions" / f"{m}.jsonl")
            .read_text(encoding="utf-8")
            .splitlines()
        )
        assert len(rows) == 6
    blind = [
        json.loads(r)["caption"]
        for r in (tmp_path / "seed" / "winrate" / "captions" / "blind_lm.jsonl")
        .read_text(encoding="utf-8")
        .splitlines()
    ]
    assert len(set(blind)) > 1  # sampled, so not one caption for every image
    for f in ("report.md", "winrate.png", "results.json"):
        assert any(p.name == f for p in (tmp_path / "seed").rglob(f)), f
    # the ablation: VQA and grounding of stage-1-only and of each stage-2 bridge
    assert set(res["models"]) == methods - {"alt_text", "blind_lm"}
    for m in res["models"].values():
        assert 0.0 <= m["vqa_accuracy"] <= 1.0 and m["vqa_questions"] > 0 and m["grounding_items"] > 0
    # every bridge got its own stage 1 and stage 2, trained by the real loop
    for b in BRIDGE_NAMES:
        cfg = json.loads((tmp_path / "seed" / "models" / b / "stage2" / "config.json").read_text())
        assert cfg["model"]["bridge"]["type"] == b


def test_data_quality_experiment_filters_half_and_compares(opts, tmp_path):
    res = data_quality_experiment(opts, tmp_path / "dq")
    pairs = {k: v["pairs"] for k, v in res["variants"].items()}
    assert pairs["noisy_2N"] == 2 * pairs["noisy_N"] == 2 * pairs["filtered_N"]
    assert res["filter"]["n_kept"] == pairs["filtered_N"]
    for v in res["variants"].values():
        assert 0.0 <= v["vqa_accuracy"] <= 1.0 and v["vqa_questions"] > 0
        assert 0.0 <= v["stage1_only"]["vqa_accuracy"] <= 1.0
    assert set(res["winrate_stage2"]) == {
        "stage2_filtered_N",
        "stage2_noisy_N",
        "stage2_noisy_2N",
        "alt_text",
    }
    assert sum(m["win_rate"] for m in res["winrate_stage1_only"].values()) == pytest.approx(1.0)
    # stage 1 read the web text (txt), not the clean caption
    run = (tmp_path / "dq" / "models" / "noisy_N" / "stage1" / "train" / "run.yaml").read_text()
    assert "text_field: txt" in run
