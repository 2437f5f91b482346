r"""Stage-2 data with several QA turns per VQA conversation and several boxes per grounding one.

    python docs/experiments/mini_diagnosis/multi_qa.py 5 3 /tmp/instruct_multi.jsonl
    seechat train seechat/mini/recipes/stage2.yaml 'data.paths=[/tmp/instruct_multi.jsonl]' \
        train.output_dir=/tmp/s2_multi

Same train scenes, images, conversation kinds and mix as `runs/mini/world/instruct/train.jsonl`
(WorldConfig() defaults); a "vqa" conversation asks K_VQA questions of different types
(`scene_text.vqa_set`), a "grounding" one up to K_GRD referring expressions; other kinds are unchanged.
"""

import json
import random
import sys
from pathlib import Path

from seechat.mini import scene_text
from seechat.mini.world import INSTRUCT_KINDS, WorldConfig, _conversation, _instruct_turns, split_scenes

k_vqa, k_grd, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
cfg = WorldConfig()
turns_written = 0


def grounding_turns(scene, rng: random.Random) -> list[scene_text.Turn]:
    seen: set[str] = set()
    turns: list[scene_text.Turn] = []
    for _ in range(3 * k_grd):
        g = scene_text.grounding(scene, rng)
        if g is not None and g.expression not in seen:
            seen.add(g.expression)
            turns.append((scene_text.grounding_instruction(g.expression, rng), g.answer))
        if len(turns) == k_grd:
            break
    return turns


with open(out, "w", encoding="utf-8") as f:
    for i, scene in enumerate(split_scenes(cfg)["train"]):
        key = f"{cfg.key_offset('train') + i:09d}"
        rng = random.Random(f"multi/{i}")
        for n, kind in enumerate(
            rng.choices(INSTRUCT_KINDS, weights=cfg.instruct_weights, k=cfg.instruct_per_image)
        ):
            turns: list[scene_text.Turn] = []
            if kind == "vqa":
                turns = [(q.question, q.answer) for q in scene_text.vqa_set(scene, rng, k_vqa)]
            elif kind == "grounding":
                turns = grounding_turns(scene, rng)
            turns = turns or _instruct_turns(scene, kind, rng)
            turns_written += len(turns)
            row = {
                "id": f"{key}-{n}",
                "kind": kind,
                "image": f"images/train/{key}.jpg",
                "conversations": _conversation(turns),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
print("turns", turns_written)
