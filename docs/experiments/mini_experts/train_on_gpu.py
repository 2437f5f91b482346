"""Train the shipped mini experts on one GPU inside a fixed time budget (the run behind seechat/mini/weights).

    python docs/experiments/mini_experts/train_on_gpu.py OUT BUDGET_SECONDS [NAME=EXTRA_SETTINGS ...]

Runs `seechat mini experts` for the CLIP and for each LM variant *concurrently* on the one GPU (these
models are far too small to fill it), first for 60 steps to measure each run's step time under that
sharing, then for as many steps as fit in BUDGET_SECONDS (at most the recipe's own), each evaluated on
the default world's val split (env ONLY=lm,...: only those runs; env EXAM_EVERY=N: the LM runs
also read the reading exam every N steps into metrics.jsonl, `seechat mini experts --exam-every`).
Writes OUT/NAME.tar.gz (the expert folders, with done.json, metrics, loss.png and eval.json) and
OUT/summary.json. Not package code: an experiment driver.

On the device tool the image lacks two of the package's wheels; carry them (downloaded here into
the ignored build/whl) and install them first:

    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d build/whl transformers==5.24.0 braceexpand==0.1.7
    run(carry=["build/whl"], command="python3 -m pip install -q --no-index --no-deps --target /tmp/site "
        "build/whl/*.whl && PYTHONPATH=/tmp/site:$PWD ONLY=lm EXAM_EVERY=1000 python3 "
        "docs/experiments/mini_experts/train_on_gpu.py $OUT 420")

The probe runs alone: anything else on the GPU while it runs makes the rate it measures, and so
the steps, too small (2026-11-27: GPU tests beside it cut a 240 s budget to 104 s of training).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from seechat.mini.world import WorldConfig, build_world

OUT, BUDGET = Path(sys.argv[1]), float(sys.argv[2])
RUNS = {"clip": ("clip", [], 6), "lm": ("lm", [], 9)}  # name: (expert, settings, loader workers)
for arg in sys.argv[3:]:  # e.g. lm6=lm.layers=6,lm.heads=8
    name, _, sets = arg.partition("=")
    RUNS[name] = (sets.split(".")[0], sets.split(","), 3)
if os.environ.get("ONLY"):  # e.g. ONLY=lm: the CLIP expert is done, give the LM the whole GPU
    RUNS = {n: r for n, r in RUNS.items() if n in os.environ["ONLY"].split(",")}
DEFAULT_STEPS = {"clip": 30000, "lm": 60000}  # caps; the budget decides


def launch(name: str, out: Path, sets: list[str], workers: int, evaluate: str | None) -> subprocess.Popen:
    """`seechat mini experts` for run `name` into `out`, logging to /tmp/<out parent>-<name>.log."""
    expert = RUNS[name][0]
    cmd = [
        sys.executable,
        "-m",
        "seechat.cli",
        "mini",
        "experts",
        "--only",
        expert,
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--force",
        "--set",
        *sets,
    ]
    if evaluate:
        cmd += ["--evaluate", evaluate]
        if expert == "lm" and os.environ.get("EXAM_EVERY"):  # the main run only, not the probe
            cmd += ["--exam-every", os.environ["EXAM_EVERY"]]
    log = open(f"/tmp/{out.parent.name}-{name}.log", "w")  # noqa: SIM115 (lives as long as the run)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def main() -> None:
    t0 = time.time()
    small = os.environ.get("DRY_RUN") == "1"  # a CPU rehearsal: a tiny world
    cfg = WorldConfig(n_train=64, n_val=32, n_test=16) if small else WorldConfig()
    world = build_world(
        "/tmp/world-dry" if small else "/tmp/world", cfg, workers=min(16, os.cpu_count() or 1), progress=False
    ).root
    print(f"world {time.time() - t0:.0f} s", flush=True)
    probes = {
        n: launch(n, Path(f"/tmp/probe/{n}"), sets + [f"{e}.steps=60"], w, None)
        for n, (e, sets, w) in RUNS.items()
    }
    rate = {}
    for n, p in probes.items():
        p.wait()
        rows = [json.loads(x) for x in open(f"/tmp/probe/{n}/{RUNS[n][0]}/metrics.jsonl")]
        rate[n] = (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (rows[-1]["step"] - rows[0]["step"])
    steps = {
        n: min(DEFAULT_STEPS[RUNS[n][0]], max(20, int(BUDGET / r) // 100 * 100)) for n, r in rate.items()
    }
    print(f"probe done at {time.time() - t0:.0f} s; s/step {rate}; steps {steps}", flush=True)
    mains = {
        n: launch(n, Path(f"/tmp/main/{n}"), sets + [f"{e}.steps={steps[n]}"], w, str(world))
        for n, (e, sets, w) in RUNS.items()
    }
    summary = {"rate_s_per_step": rate, "steps": steps}
    for n, p in mains.items():
        summary[f"{n}_rc"] = p.wait()
        d = Path(f"/tmp/main/{n}/{RUNS[n][0]}")
        if (d / "eval.json").exists():
            summary[n] = {
                "eval": json.loads((d / "eval.json").read_text()),
                "done": json.loads((d / "done.json").read_text()),
            }
            with tarfile.open(OUT / f"{n}.tar.gz", "w:gz") as tar:
                tar.add(d, arcname=RUNS[n][0])
        print(f"{n} finished at {time.time() - t0:.0f} s rc {summary[f'{n}_rc']}", flush=True)
        print(open(f"/tmp/main-{n}.log").read()[-1500:], flush=True)
    (OUT / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1))
    print(json.dumps(summary, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
