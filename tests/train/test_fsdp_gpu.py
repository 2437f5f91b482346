"""`seechat train` under accelerate's FSDP2 (configs/accelerate/fsdp.yaml) on the GPUs this machine
has: the curve of the unsharded run, a killed-and-resumed run equal to an uninterrupted one, and a
checkpoint that loads unsharded. Skipped without CUDA: accelerate will not shard on a CPU (the
CPU-side proof of the sharded state is test_sharded_state.py). Results of the last GPU run are in
docs/distributed.md ("What is tested").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from seechat.atomic import existing
from seechat.config import load_config
from seechat.data.collate import collate
from seechat.model.checkpoint import load_checkpoint
from seechat.train.data import load_conversation_dataset
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP through accelerate needs CUDA")

ROOT = Path(__file__).resolve().parents[2]
STAGE2 = ROOT / "seechat" / "mini" / "recipes" / "stage2.yaml"
FSDP = ROOT / "configs" / "accelerate" / "fsdp.yaml"
STEPS = 8


def overrides(w, out: Path, **extra) -> list[str]:
    return tiny_overrides(
        w,
        str(out),
        **{
            "data.paths": f"{w['world']}/instruct/train.jsonl",
            "data.image_root": w["world"],
            "train.init_from": "",
            "model.bridge.type": "qformer",
            "model.bridge.num_queries": 8,
            "optim.warmup_steps": 2,
            "train.max_steps": STEPS,
            "train.batch_size": 8,
            "train.log_every": 1,
            "train.group_by_length": "false",
            **extra,
        },
    )  # length groups depend on the micro-batch size


def launch(w, out: Path, fsdp: bool, precision: str = "no", wait: bool = True, **extra) -> subprocess.Popen:
    """`seechat train`, under `accelerate launch` with fsdp.yaml on every GPU or as one plain process.
    Precision is the recipe's (train.mixed_precision), which the loop gives accelerate."""
    gpus = torch.cuda.device_count()
    head = (
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(FSDP),
            "--num_processes",
            str(gpus),
        ]
        if fsdp
        else [sys.executable]
    )
    if precision != "no":  # "no" is the recipes' default (and YAML would read a bare no as false)
        extra["train.mixed_precision"] = precision
    train = ["-m", "seechat.cli", "train", str(STAGE2), *overrides(w, out, **extra)]
    proc = subprocess.Popen(
        head + train,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-4000:]
    return proc


def losses(out: Path) -> list[float]:
    return [json.loads(r)["loss"] for r in (out / "train" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp_gpu")
    launch(tiny_world, root / "plain", fsdp=False)
    launch(tiny_world, root / "fsdp", fsdp=True)
    launch(tiny_world, root / "fsdp_bf16", fsdp=True, precision="bf16")
    # the reference stage-2 recipe accumulates: 2 micro-batches of 4 are the same global batch of 8
    launch(tiny_world, root / "fsdp_accum", fsdp=True, **{"train.batch_size": 4, "train.grad_accum": 2})
    return root


def test_fsdp_run_follows_the_unsharded_curve(runs):
    plain, fsdp = losses(runs / "plain"), losses(runs / "fsdp")
    summary = json.loads((runs / "fsdp" / "train" / "summary.json").read_text())
    assert (summary["distributed_type"], summary["num_processes"]) == ("FSDP", torch.cuda.device_count())
    assert len(fsdp) == STEPS and fsdp == pytest.approx(plain, rel=1e-3)
    assert plain[0] - plain[-1] > 10 * 1e-3 * plain[0]  # the curve moves well beyond the tolerance
    bf16 = losses(runs / "fsdp_bf16")
    assert losses(runs / "fsdp_accum") == pytest.approx(plain, rel=1e-3)  # gradient sync skipped, then done
    assert torch.isfinite(torch.tensor(bf16)).all() and bf16 == pytest.approx(plain, rel=0.05)
    assert bf16 != pytest.approx(plain, rel=1e-4)  # bf16 compute did happen


def test_fsdp_checkpoint_loads_unsharded_with_the_unsharded_runs_weights(runs, tiny_world):
    model, processor = load_checkpoint(runs / "fsdp")
    reference, _ = load_checkpoint(runs / "plain")
    cfg = load_config(STAGE2, overrides(tiny_world, runs / "fsdp"))
    data = load_conversation_dataset(cfg.data, processor)
    batch = collate([data[i] for i in range(4)], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=1e-2, atol=1e-2)


def test_killed_fsdp_run_resumes_to_the_uninterrupted_result(runs, tiny_world):
    out = runs / "killed"
    proc = launch(tiny_world, out, fsdp=True, precision="bf16", wait=False, **{"train.save_every": 3})
    state, deadline = out / "train" / "resume" / "state.json", time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[0][-4000:]
    launcher = psutil.Process(proc.pid)
    for p in [*launcher.children(recursive=True), launcher]:
        p.kill()
    proc.wait()
    saved = existing(state.parent) / state.name  # a kill between a save's two renames sets it aside
    assert json.loads(saved.read_text())["position"]["step"] in range(3, STEPS)
    launch(tiny_world, out, fsdp=True, precision="bf16", **{"train.save_every": 3})
    assert losses(out) == pytest.approx(losses(runs / "fsdp_bf16"), rel=1e-5)
