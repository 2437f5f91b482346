"""The demo's evaluation goes through `seechat eval`'s task table: the same prompts, decoding and
scores as `seechat eval vqa|grounding`, plus the blind control."""

from __future__ import annotations

from pathlib import Path

from seechat.cli import main
from seechat.data.jsonl import read_jsonl
from seechat.mini.evaluate import answer_split, load_images

ROWS, BATCH, NEW_TOKENS = 8, 4, 8


def eval_cli(task: str, world_ckpt: Path, data: Path, out: Path) -> list[dict]:
    args = ["eval", task, "--model", str(world_ckpt), "--data", str(data), "--out", str(out), "--no-progress"]
    args += ["--limit", str(ROWS), "--batch-size", str(BATCH), "--max-new-tokens", str(NEW_TOKENS)]
    assert main(args) == 0
    return read_jsonl(out / "predictions.jsonl")


def test_demo_evaluation_equals_seechat_eval(world_ckpt, tiny_world, tmp_path):
    from seechat.model import load

    world = Path(tiny_world["world"])
    vqa = read_jsonl(world / "test" / "vqa.jsonl")[:ROWS]
    grd = read_jsonl(world / "test" / "grounding.jsonl")[:ROWS]
    model, processor = load(world_ckpt)
    metrics, preds = answer_split(
        model, processor, load_images(world, vqa + grd), vqa, grd, [], BATCH, max_new_tokens=NEW_TOKENS
    )

    vqa_rows = eval_cli("vqa", world_ckpt, world / "test" / "vqa.jsonl", tmp_path / "vqa")
    grd_rows = eval_cli("grounding", world_ckpt, world / "test" / "grounding.jsonl", tmp_path / "grd")
    assert preds["vqa"] == [r["prediction"] for r in vqa_rows]
    assert preds["grounding"] == [r["prediction"] for r in grd_rows]
    assert metrics["vqa_accuracy"] == sum(r["correct"] for r in vqa_rows) / ROWS
    assert metrics["grounding_acc_at_0.5"] == sum(r["correct"] for r in grd_rows) / ROWS
    # the blind control asks the same questions about a blank image
    assert len(preds["vqa_blind"]) == ROWS and 0.0 <= metrics["vqa_accuracy_blind"] <= 1.0
    assert set(metrics["vqa_accuracy_blind_by_type"]) == {r["type"] for r in vqa}
