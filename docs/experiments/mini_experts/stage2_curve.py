"""The stage-2 learning curve: one long stage 2, a snapshot every EVERY steps, each scored on the default
world's val split (docs/mini-world-results.md, "The stage-2 curve"). Not package code: an experiment driver.

    python -c "from seechat.mini.world import WorldConfig, build_world; \
        build_world('runs/w30/world', WorldConfig(n_train=30000), workers=2)"
    RUN=runs/w30 STAGE1=runs/mini/stage1 \
        python docs/experiments/mini_experts/stage2_curve.py OUT 2080 260 ["S2_OVERRIDES"]

RUN is the run folder whose world/ trains stage 2 (its val split is the default world's whatever
n_train is: every split draws from its own seeded stream); STAGE1 the stage-1 checkpoint to start
from. Stage 2 runs in a child process with train.save_every=EVERY; this process copies each
checkpoint as its resume point appears (OUT/snaps/stepNNNNN), then scores every snapshot on
runs/mini/world's val split and prints one JSON line per snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from seechat.data.jsonl import read_jsonl
from seechat.mini.evaluate import answer_split, load_images
from seechat.model import load


def main() -> None:
    out, steps, every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    extra = sys.argv[4].split(",") if len(sys.argv) > 4 and sys.argv[4] else []
    overrides = [*extra, f"train.max_steps={steps}", f"train.save_every={every}"]
    code = (
        "from pathlib import Path; from seechat.mini.demo import Assets, run_stage; "
        f"run_stage(Assets.of_run(Path({os.environ['RUN']!r})), Path({str(out / 'stage2')!r}), "
        f"'stage2', None, {overrides!r}, init_from=Path({os.environ['STAGE1']!r}))"
    )
    snaps = out / "snaps"
    snaps.mkdir(parents=True, exist_ok=True)
    state = out / "stage2" / "train" / "resume" / "state.json"
    with open(out / "train.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
        while True:
            done = child.poll() is not None
            try:
                step = json.loads(state.read_text())["position"]["step"]
            except (OSError, ValueError, KeyError):
                step = 0
            target = snaps / f"step{step:05d}"
            if step and not target.exists():  # the checkpoint is written before its resume point
                shutil.copytree(out / "stage2", target, ignore=shutil.ignore_patterns("train"))
            if done:
                break
            time.sleep(10)
    if child.returncode:
        sys.exit(f"stage 2 failed (exit {child.returncode}); see {out / 'train.log'}")
    world = Path("runs/mini/world")
    vqa, grd = read_jsonl(world / "val/vqa.jsonl"), read_jsonl(world / "val/grounding.jsonl")
    images = load_images(world, vqa + grd)
    for snap in sorted(snaps.iterdir()):
        model, processor = load(snap)
        metrics, _ = answer_split(model, processor, images, vqa, grd, [])
        print(json.dumps({"step": int(snap.name[4:]), **metrics}, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
