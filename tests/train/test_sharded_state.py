"""FSDP2-sharded training state on real processes: 2 CPU ranks over gloo shard the stage-2 model
(decoder layers and root, as accelerate's FSDP2 wraps it), and what `seechat.train.state` gathers,
saves and loads is the same as an unsharded run's, whichever way a run moves between the two.

accelerate will not shard on a CPU (it falls back to DDP: docs/distributed.md), so these tests
shard with torch's `fully_shard` directly; the accelerate-driven FSDP run of `seechat train` is
checked on a GPU (benchmarks/RESULTS.md). What they catch: a resume point that holds one rank's
shard instead of the whole tensor (shapes and values differ), optimizer moments that do not go
back to the parameter they belong to (the step after resume differs), and a checkpoint written
from shards (it does not load, or holds other values).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seechat.model.checkpoint import load_checkpoint
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-5  # float32, same batch, other summation order across shards


def run(mode: str, overrides: Path, out: Path, shard: bool, resume_from: Path | None = None) -> dict:
    worker = ["-m", "tests.train.sharded_worker", mode, str(overrides), str(out)]
    worker += ["--shard"] if shard else []
    worker += ["--resume-from", str(resume_from)] if resume_from else []
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        if shard
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(launch + worker, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sharded")
    w = tiny_world
    overrides = root / "overrides.json"
    overrides.write_text(
        json.dumps(
            tiny_overrides(
                w,
                str(root / "unused"),
                **{
                    "data.paths": f"{w['world']}/instruct/train.jsonl",
                    "data.image_root": w["world"],
                    "train.init_from": "",
                    "model.bridge.type": "qformer",
                    "model.bridge.num_queries": 8,
                },
            )
        )
    )
    result = {
        "root": root,
        "sharded": run("train_save", overrides, root / "sharded", shard=True),
        "plain": run("train_save", overrides, root / "plain", shard=False),
    }
    resume = root / "sharded" / "resume"
    result["plain_from_sharded"] = run("resume", overrides, root / "plain_from_sharded", False, resume)
    result["sharded_from_plain"] = run(
        "resume", overrides, root / "sharded_from_plain", True, root / "plain" / "resume"
    )
    return result


def test_sharded_training_matches_unsharded(runs):
    assert runs["sharded"]["world_size"] == 2
    assert runs["sharded"]["losses"] == pytest.approx(runs["plain"]["losses"], rel=RTOL)
    assert (
        runs["plain"]["losses"][2] < runs["plain"]["losses"][0]
    )  # it trains: the comparison is not of a flat line


def test_resume_point_holds_whole_tensors_equal_to_the_unsharded_run(runs):
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        sharded = load_file(runs["root"] / "sharded" / "resume" / name)
        plain = load_file(runs["root"] / "plain" / "resume" / name)
        keys = {k for k in plain if not k.startswith("rng.")}
        assert keys == {k for k in sharded if not k.startswith("rng.")}
        assert any(".exp_avg_sq" in k for k in keys) if name.startswith("optimizer") else len(keys) > 10
        for k in keys:
            assert sharded[k].shape == plain[k].shape, k
            torch.testing.assert_close(sharded[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize(
    "run_name, source", [("plain_from_sharded", "sharded"), ("sharded_from_plain", "plain")]
)
def test_resume_across_sharding_continues_the_run(runs, run_name, source):
    """The step after resuming equals the source run's own third step, and the state loaded into
    the (re)sharded model gathers back to exactly the tensors on disk."""
    resumed = runs[run_name]
    assert resumed["step"] == 2
    assert resumed["losses"][0] == pytest.approx(runs[source]["losses"][2], rel=RTOL)
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        saved = load_file(runs["root"] / source / "resume" / name)
        reloaded = load_file(runs["root"] / run_name / "reloaded" / name)
        for k, v in saved.items():
            if not k.startswith("rng."):
                assert torch.equal(v, reloaded[k]), k


def test_checkpoint_written_from_shards_loads_unsharded(runs):
    model, _ = load_checkpoint(runs["root"] / "sharded" / "ckpt")
    trained = load_file(runs["root"] / "sharded" / "resume" / "trainable.safetensors")
    params = dict(model.named_parameters())
    assert any(k.startswith("language_model.") for k in trained) and any(
        k.startswith("bridge.") for k in trained
    )
    for k, v in trained.items():
        torch.testing.assert_close(params[k], v, rtol=0, atol=0, msg=k)
