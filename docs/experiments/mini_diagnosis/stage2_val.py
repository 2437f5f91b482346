"""VQA (per type) and grounding Acc@0.5 of a stage-2 checkpoint on the world's val split.

python docs/experiments/mini_diagnosis/stage2_val.py runs/mini/stage2
"""

import json
import sys
from pathlib import Path

from seechat.data.jsonl import read_jsonl
from seechat.mini.evaluate import answer_split, load_images
from seechat.model import load

checkpoint, world = sys.argv[1], Path("runs/mini/world")
vqa, grounding = read_jsonl(world / "val" / "vqa.jsonl"), read_jsonl(world / "val" / "grounding.jsonl")
model, processor = load(checkpoint)
metrics, _ = answer_split(
    model, processor, load_images(world, vqa + grounding), vqa, grounding, [], tag=checkpoint
)
print(
    json.dumps(
        {
            "checkpoint": checkpoint,
            "vqa": round(metrics["vqa_accuracy"], 3),
            "grounding": round(metrics["grounding_acc_at_0.5"], 3),
            "by_type": {k: round(v, 2) for k, v in metrics["vqa_accuracy_by_type"].items()},
        }
    )
)
