"""A demo checkpoint's VQA on its training data beside the held-out splits, and on a world of another seed.

    python docs/experiments/mini_experts/heldout.py CHECKPOINT WORLD

Train: the question of the first 1000 one-question VQA conversations of stage 2's own data; val:
the world's val split; then the test split of a world built with seed 1 (never seen by any stage).
Each with the blind control (a blank image). Not package code: an experiment driver.
"""

import json
import sys
from pathlib import Path

from seechat.data.jsonl import read_jsonl
from seechat.mini.evaluate import answer_split, load_images
from seechat.mini.world import WorldConfig, build_world
from seechat.model import load


def main() -> None:
    ck = Path(sys.argv[1])
    world = Path(sys.argv[2])
    model, proc = load(ck)
    # train split: the first question of the first 1000 single-question VQA conversations of stage 2's data
    rows = [
        r
        for r in read_jsonl(world / "instruct/train.jsonl")
        if r["kind"] == "vqa" and len(r["conversations"]) == 2
    ][:1000]
    train_vqa = [
        {
            "image": r["image"],
            "question": r["conversations"][0]["value"].removeprefix("<image>\n"),
            "answer": r["conversations"][1]["value"],
            "type": "all",
        }
        for r in rows
    ]
    m, _ = answer_split(model, proc, load_images(world, train_vqa), train_vqa, [], [])
    print("train-split VQA", json.dumps({k: m[k] for k in ("vqa_accuracy", "vqa_accuracy_blind")}))
    val = read_jsonl(world / "val/vqa.jsonl")
    m, _ = answer_split(model, proc, load_images(world, val), val, [], [])
    print("val-split VQA", json.dumps({k: m[k] for k in ("vqa_accuracy", "vqa_accuracy_blind")}))
    other = build_world("/tmp/x/world-seed1", WorldConfig(seed=1), workers=2, progress=False).root
    vqa, grd = read_jsonl(other / "test/vqa.jsonl"), read_jsonl(other / "test/grounding.jsonl")
    m, _ = answer_split(model, proc, load_images(other, vqa + grd), vqa, grd, [])
    print("seed-1 world test split", json.dumps(m, ensure_ascii=False))


if __name__ == "__main__":
    main()
