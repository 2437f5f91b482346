"""The training loop: learns, resumes exactly after a real kill, stops on NaN keeping the last good state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seechat.config import load_config
from seechat.model import load
from seechat.train.loop import NonFiniteLossError, lr_at, train
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
STAGE1 = ROOT / "configs" / "mini" / "stage1.yaml"
STAGE2 = ROOT / "configs" / "mini" / "stage2.yaml"


def stage1_overrides(w, out, **extra):
    shards = f"{w['world']}/pairs/train/{{00000..00003}}.tar"
    return tiny_overrides(w, out, **{"data.paths": shards, "train.batch_size": 4, "model.bridge.type": "qformer",
                                     "model.bridge.num_queries": 8, "optim.warmup_steps": 2, **extra})


def losses(out) -> list[float]:
    return [json.loads(r)["loss"] for r in (Path(out) / "train" / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_then_decays():
    cfg = load_config(None, ["optim.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1", "train.max_steps=110"])
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_stage1_then_stage2_write_checkpoints(tiny_world, tmp_path):
    s1 = tmp_path / "s1"
    cfg1 = load_config(STAGE1, stage1_overrides(tiny_world, s1, **{"train.max_steps": 4}))
    train(cfg1)
    meta = json.loads((s1 / "config.json").read_text())
    assert meta["parts"] == {"vision": "base", "lm": "base"}  # stage 1 saves the bridge alone
    assert (s1 / "train" / "loss.png").stat().st_size > 1000
    assert json.loads((s1 / "train" / "summary.json").read_text())["status"] == "done"

    s2 = tmp_path / "s2"
    over = tiny_overrides(tiny_world, s2, **{
        "train.init_from": s1, "train.max_steps": 3, "train.batch_size": 4, "model.bridge.type": "qformer",
        "model.bridge.num_queries": 8, "data.paths": f"{tiny_world['world']}/instruct/train.jsonl", "data.image_root": tiny_world["world"],
    })
    train(load_config(STAGE2, over))
    assert json.loads((s2 / "config.json").read_text())["parts"]["lm"] in ("full", "lora")
    model, _ = load(s2)
    assert model.num_image_tokens == 8


def test_init_from_with_other_bridge_is_refused(tiny_world, tmp_path):
    s1 = tmp_path / "s1"
    train(load_config(STAGE1, stage1_overrides(tiny_world, s1, **{"train.max_steps": 1})))
    over = stage1_overrides(tiny_world, tmp_path / "x", **{"train.init_from": s1, "model.bridge.type": "linear"})
    with pytest.raises(ValueError, match="model.bridge"):
        train(load_config(STAGE1, over))


def test_killed_and_resumed_run_matches_uninterrupted(tiny_world, tmp_path):
    common = {"train.max_steps": 8, "train.save_every": 3}
    ref = tmp_path / "ref"
    train(load_config(STAGE1, stage1_overrides(tiny_world, ref, **common)))

    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "seechat.cli", "train", str(STAGE1), *stage1_overrides(tiny_world, killed, **common)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    state = killed / "train" / "resume" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_step = json.loads(state.read_text())["position"]["step"]
    assert saved_step in (3, 6)

    train(load_config(STAGE1, stage1_overrides(tiny_world, killed, **common)))
    assert losses(killed) == losses(ref)  # bit-identical: same data, optimizer, RNG
    a, _ = load(ref)
    b, _ = load(killed)
    for (n, p), (_, q) in zip(a.bridge.named_parameters(), b.bridge.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_world, tmp_path):
    out = tmp_path / "nan"
    over = stage1_overrides(tiny_world, out, **{"train.max_steps": 6, "train.save_every": 1, "optim.lr": 1e30,
                                                "optim.grad_clip": 0.0, "optim.warmup_steps": 0})
    with pytest.raises(NonFiniteLossError, match="last good"):
        train(load_config(STAGE1, over))
    step = json.loads((out / "train" / "resume" / "state.json").read_text())["position"]["step"]
    assert step >= 1
    assert all(map(lambda x: x == x and abs(x) < float("inf"), losses(out)))
    load(out)  # the checkpoint on disk is complete and loadable


def test_torchrun_that_accelerate_does_not_see_is_refused(tiny_world, tmp_path, monkeypatch):
    """WORLD_SIZE=2 but accelerate sees one process: N separate runs into one folder; refuse."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        train(load_config(STAGE1, stage1_overrides(tiny_world, tmp_path / "x", **{"train.max_steps": 1})))
    assert not (tmp_path / "x" / "train" / "resume").exists()


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way up handles it."""


def test_a_kill_between_the_checkpoint_renames_keeps_the_resume_point(tiny_world, tmp_path, monkeypatch, caplog):
    """The final save sets the step-2 checkpoint (with train/resume inside) aside and dies before
    renaming the new one in: no `killed/` is left. The next start must still resume from step 2
    (it used to find nothing and restart at step 0)."""
    out = tmp_path / "killed"
    cfg = load_config(STAGE1, stage1_overrides(tiny_world, out, **{"train.max_steps": 4, "train.save_every": 2}))
    real_rename, set_aside = os.rename, []

    def rename_then_die(src, dst):
        real_rename(src, dst)
        if Path(src) == out and Path(dst).name.startswith(".killed.old-"):
            set_aside.append(dst)
            if len(set_aside) == 2:  # the first save set aside the folder holding only train/run.yaml
                raise Killed

    monkeypatch.setattr(os, "rename", rename_then_die)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.undo()
    assert not out.exists()
    uninterrupted = losses(set_aside[1])  # all 4 steps were logged before the final save

    with caplog.at_level("INFO", logger="seechat"):
        train(cfg)
    assert "resuming from step 2" in caplog.text
    assert losses(out) == uninterrupted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed"]
