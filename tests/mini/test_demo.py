"""CI-sized end to end: every stage of `seechat demo` on a small world, from the shipped experts."""

from __future__ import annotations

import json

import pytest

from seechat.data.jsonl import read_jsonl
from seechat.mini import demo as demo_module
from seechat.mini.demo import demo, sample_dialogue
from seechat.mini.world import WorldConfig, build_world

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
    turns = saved["sample_dialogue"]
    assert saved["sample_dialogue_image"].startswith("images/test/") and len(turns) == 3
    assert all(isinstance(t["right"], bool) and t["reference"] and t["user"] for t in turns)

    # Re-running reuses every finished step: nothing is trained again.
    marks = [tmp_path / "run" / s / "train" / "summary.json" for s in ("stage1", "stage2")]
    before = [m.stat().st_mtime_ns for m in marks]
    demo(tmp_path / "run", world_cfg=WORLD, stage_extra=STAGES, eval_limit=40)
    assert [m.stat().st_mtime_ns for m in marks] == before


def test_sample_dialogue_asks_what_the_world_can_answer_and_checks_each_reply(tmp_path, monkeypatch):
    """The box question names an object as the world's grounding data does, and each reply is
    checked against the image's truth: right answers pass, wrong ones fail (the model is replaced
    by canned replies here; the end-to-end test runs the real one)."""
    world = build_world(tmp_path / "world", WorldConfig(n_train=8, n_val=4, n_test=6), progress=False).root
    grounding = read_jsonl(world / "test" / "grounding.jsonl")[0]
    caption = next(
        r for r in read_jsonl(world / "test" / "captions.jsonl") if r["image"] == grounding["image"]
    )
    n = next(
        len(r["objects"])
        for r in read_jsonl(world / "test" / "detection.jsonl")
        if r["image"] == grounding["image"]
    )
    (x0, y0, x1, y1) = grounding["box"]

    def run_with(replies: list[str]) -> tuple[str, list[dict]]:
        class Canned:
            def __init__(self, *args):
                self.replies = iter(replies)

            def ask(self, question, images, params):
                return next(self.replies)

        monkeypatch.setattr(demo_module, "load", lambda path: (None, None))
        monkeypatch.setattr(demo_module, "ChatSession", Canned)
        return sample_dialogue(tmp_path / "ckpt", world)

    image, turns = run_with(
        [caption["references"][-1] + "。", f"{n}个", f"<box>({x0},{y0}),({x1},{y1 - 5})</box>"]
    )
    assert image == grounding["image"]
    assert [t["right"] for t in turns] == [True, True, True]
    assert grounding["expression"] in turns[2]["user"] and turns[2]["reference"] == grounding["answer"]
    assert turns[1]["reference"] == str(n)
    _, turns = run_with(["一个白色的圆形", str(n + 1), "<box>(0,0),(10,10)</box>"])
    assert [t["right"] for t in turns] == [False, False, False]
