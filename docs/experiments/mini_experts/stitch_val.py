"""Stage 1 + stage 2 from the shipped experts, scored on the default world's val split (the lever table
of docs/mini-world-results.md). Not package code: an experiment driver.

    python docs/experiments/mini_experts/stitch_val.py OUT "S1_OVERRIDES" "S2_OVERRIDES" [N_QUESTIONS]

Overrides are comma-separated `key=value` (empty: the recipe as is). Environment: RUN (a run folder
whose world/ trains the stages; default runs/mini), STAGE1 (an existing stage-1 checkpoint to start
stage 2 from instead of training one). Prints one JSON line: stage wall times, val VQA per type,
the blind control (a blank image), grounding Acc@0.5.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from seechat.data.jsonl import read_jsonl
from seechat.mini.demo import Assets, run_stage
from seechat.mini.evaluate import answer_split, load_images
from seechat.model import load


def main() -> None:
    out = Path(sys.argv[1])
    s1 = sys.argv[2].split(",") if sys.argv[2] else []
    s2 = sys.argv[3].split(",") if sys.argv[3] else []
    limit = int(sys.argv[4]) if len(sys.argv) > 4 else 200
    assets = Assets.of_run(Path(os.environ.get("RUN", "runs/mini")))
    t = time.time()
    p1 = (
        Path(os.environ["STAGE1"])
        if os.environ.get("STAGE1")
        else run_stage(assets, out / "stage1", "stage1", None, s1)
    )
    t1 = time.time() - t
    p2 = run_stage(assets, out / "stage2", "stage2", None, s2, init_from=p1)
    t2 = time.time() - t - t1
    model, processor = load(p2)
    world = Path("runs/mini/world")  # always scored on the default world's val split
    vqa, grd = (
        read_jsonl(world / "val/vqa.jsonl")[:limit],
        read_jsonl(world / "val/grounding.jsonl")[: limit // 2],
    )
    metrics, _ = answer_split(model, processor, load_images(world, vqa + grd), vqa, grd, [])
    print(json.dumps({"t_stage1": round(t1), "t_stage2": round(t2), **metrics}, ensure_ascii=False))


if __name__ == "__main__":
    main()
