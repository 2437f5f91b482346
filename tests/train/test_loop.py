"""The training loop: learns, resumes exactly after a real kill, stops on NaN keeping the last good state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from seechat.atomic import existing
from seechat.config import LMConfig, ModelConfig, VisionConfig, load_config
from seechat.model import load
from seechat.train.loop import NonFiniteLossError, check_init_matches, check_sharded_parts, lr_at, train
from tests.conftest import tiny_overrides
from tests.train.tracker_readers import HAS_TENSORBOARD, tensorboard_raw_steps, tensorboard_scalars

ROOT = Path(__file__).resolve().parents[2]
STAGE1 = ROOT / "seechat" / "mini" / "recipes" / "stage1.yaml"
STAGE2 = ROOT / "seechat" / "mini" / "recipes" / "stage2.yaml"


def stage1_overrides(w, out, **extra):
    shards = f"{w['world']}/pairs/train/{{00000..00003}}.tar"
    return tiny_overrides(
        w,
        out,
        **{
            "data.paths": shards,
            "train.batch_size": 4,
            "model.bridge.type": "qformer",
            "model.bridge.num_queries": 8,
            "optim.warmup_steps": 2,
            **extra,
        },
    )


def stage2_overrides(w, out, init_from, **extra):
    """Stage 2 from `init_from` (a stage-1 run of stage1_overrides), 3 steps, with held-out data."""
    return tiny_overrides(
        w,
        out,
        **{
            "train.init_from": init_from,
            "train.max_steps": 3,
            "train.batch_size": 4,
            "model.bridge.type": "qformer",
            "model.bridge.num_queries": 8,
            "data.paths": f"{w['world']}/instruct/train.jsonl",
            "data.image_root": w["world"],
            "data.eval_paths": f"{w['world']}/instruct/val.jsonl",
            **extra,
        },
    )


def losses(out) -> list[float]:
    return [json.loads(r)["loss"] for r in (Path(out) / "train" / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warms_up_then_decays():
    cfg = load_config(
        None, ["optim.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1", "train.max_steps=110"]
    )
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
    train(load_config(STAGE2, stage2_overrides(tiny_world, s2, s1, **{"train.eval_batches": 1})))
    (held_out,) = [json.loads(r) for r in (s2 / "train" / "eval.jsonl").read_text().splitlines()]
    assert held_out["step"] == 3 and held_out["samples"] == 4  # eval_batches=1: one global batch
    assert held_out["loss"] > 0 and held_out["supervised_tokens"] > 4
    assert json.loads((s2 / "config.json").read_text())["parts"]["lm"] in ("full", "lora")
    model, _ = load(s2)
    assert model.num_image_tokens == 8


def test_padding_free_and_padded_runs_train_the_same(tiny_world, tmp_path):
    """`train.padding_free` changes where the padding goes, not what is learnt: stage 1 (pairs) and
    stage 2 (conversations, LM full, per-sample averaging) log the same losses, samples and held-out
    loss either way, and the checkpoint reloads on the LM's own attention."""
    runs = {}
    for free in (False, True):
        s1 = tmp_path / f"s1-{free}"
        train(
            load_config(
                STAGE1, stage1_overrides(tiny_world, s1, **{"train.max_steps": 3, "train.padding_free": free})
            )
        )
        s2 = tmp_path / f"s2-{free}"
        extra = {"train.eval_batches": 2, "train.loss_average": "sample", "train.padding_free": free}
        train(load_config(STAGE2, stage2_overrides(tiny_world, s2, s1, **extra)))
        runs[free] = (s1, s2)
    for stage in (0, 1):
        padded, free = (_rows(runs[f][stage] / "train" / "metrics.jsonl") for f in (False, True))
        assert [r["loss"] for r in free] == pytest.approx([r["loss"] for r in padded], rel=1e-4)
        assert [r["samples_per_s"] > 0 for r in free] == [True] * 3
    (e_pad,), (e_free,) = (_rows(runs[f][1] / "train" / "eval.jsonl") for f in (False, True))
    assert e_free["loss"] == pytest.approx(e_pad["loss"], rel=1e-4)
    assert (e_free["samples"], e_free["supervised_tokens"]) == (e_pad["samples"], e_pad["supervised_tokens"])
    model, _ = load(runs[True][1])
    assert model.language_model.config._attn_implementation == "sdpa"


def test_compiled_layers_train_to_the_eager_numbers(tiny_world, tmp_path):
    """`train.compile`: the LM layers' norms, attention and MLP through torch.compile (inductor's
    C++ kernels on this CPU) train stage 2 (LM full, padding-free, activation checkpointing) to the
    eager run's losses and held-out loss, and save a checkpoint that loads as the eager one does."""
    s1 = tmp_path / "s1"
    train(load_config(STAGE1, stage1_overrides(tiny_world, s1, **{"train.max_steps": 2})))
    runs = {}
    for compiled in (False, True):
        runs[compiled] = tmp_path / f"s2-{compiled}"
        extra = {"train.eval_batches": 2, "train.gradient_checkpointing": True, "train.compile": compiled}
        train(load_config(STAGE2, stage2_overrides(tiny_world, runs[compiled], s1, **extra)))
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), rel=1e-4)
    (e_eager,), (e_compiled,) = (_rows(runs[c] / "train" / "eval.jsonl") for c in (False, True))
    assert e_compiled["loss"] == pytest.approx(e_eager["loss"], rel=1e-4)
    (a, _), (b, _) = load(runs[False]), load(runs[True])
    assert a.state_dict().keys() == b.state_dict().keys()


def test_compile_is_refused_with_deep_fusion_and_with_fsdp(tiny_world, tmp_path):
    over = stage1_overrides(tiny_world, tmp_path, **{"train.compile": True, "model.fusion": "deep"})
    with pytest.raises(ValueError, match="train.compile with model.fusion=deep"):
        train(load_config(STAGE1, over))
    cfg = load_config(STAGE1, stage1_overrides(tiny_world, tmp_path, **{"train.compile": True}))
    with pytest.raises(ValueError, match="train.compile with FSDP"):
        check_sharded_parts(cfg, SimpleNamespace(distributed_type=DistributedType.FSDP))


def test_init_from_with_other_bridge_is_refused(tiny_world, tmp_path):
    s1 = tmp_path / "s1"
    train(load_config(STAGE1, stage1_overrides(tiny_world, s1, **{"train.max_steps": 1})))
    over = stage1_overrides(
        tiny_world, tmp_path / "x", **{"train.init_from": s1, "model.bridge.type": "linear"}
    )
    with pytest.raises(ValueError, match="model.bridge"):
        train(load_config(STAGE1, over))


def test_init_from_names_the_same_experts_by_any_spelling_of_their_folder(tmp_path, monkeypatch):
    """A checkpoint `seechat demo` wrote names its experts by absolute path, the packaged recipe by a
    relative one: the same folders, so the same architecture. Another folder, or another hub id, is not."""
    for name in ("clip", "lm", "lm2"):
        (tmp_path / "weights" / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    def model(vision: str, lm: str) -> ModelConfig:
        return ModelConfig(vision=VisionConfig(path=vision), lm=LMConfig(path=lm, tokenizer_path=f"{lm}"))

    ckpt = model(str(tmp_path / "weights" / "clip"), str(tmp_path / "weights" / "lm"))
    check_init_matches(model("weights/clip", "weights/lm"), ckpt, "ckpt")
    check_init_matches(model("./weights/../weights/clip", "weights/lm"), ckpt, "ckpt")
    with pytest.raises(ValueError, match=r"model.lm differ"):
        check_init_matches(model("weights/clip", "weights/lm2"), ckpt, "ckpt")
    hub = model("OFA-Sys/chinese-clip", "Qwen/Qwen2.5-7B")
    check_init_matches(hub, hub, "ckpt")
    with pytest.raises(ValueError, match=r"model.lm differ"):
        check_init_matches(model("OFA-Sys/chinese-clip", "Qwen/Qwen2.5-3B"), hub, "ckpt")


def test_killed_and_resumed_run_matches_uninterrupted(tiny_world, tmp_path):
    """Killed after it logged steps past its last resume point, the run resumes to the same numbers;
    its TensorBoard curves and held-out losses have every step exactly once, and evaluating (which
    the reference run does not do) leaves training untouched."""
    common = {"train.max_steps": 8, "train.save_every": 3}
    ref = tmp_path / "ref"
    train(load_config(STAGE1, stage1_overrides(tiny_world, ref, **common)))

    killed = tmp_path / "killed"
    extra = {
        **common,
        "train.eval_every": 2,
        "data.eval_paths": f"{tiny_world['world']}/pairs/val/*.tar",
        "train.report_to": "tensorboard" if HAS_TENSORBOARD else "[]",
    }
    args = [
        sys.executable,
        "-m",
        "seechat.cli",
        "train",
        str(STAGE1),
        *stage1_overrides(tiny_world, killed, **extra),
    ]
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            # bit-identical needs the same CPU reduction order: this process's thread count
            "OMP_NUM_THREADS": str(torch.get_num_threads()),
        },
    )
    resume, metrics = killed / "train" / "resume", killed / "train" / "metrics.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        saved = _saved_step(resume)
        if saved is not None and max(r["step"] for r in _rows(metrics)) > saved:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _saved_step(resume) in (3, 6)

    # TensorBoard reads a run's event files in name order, and the names hold whole seconds (then the
    # pid): a resume within the killed run's first second would sort before it. No real resume is
    # that quick (a resume point has to be written first); this test can be, so it waits one second.
    time.sleep(1.1)
    train(load_config(STAGE1, stage1_overrides(tiny_world, killed, **extra)))
    assert losses(killed) == losses(ref)  # bit-identical: same data, optimizer, RNG
    a, _ = load(ref)
    b, _ = load(killed)
    for (n, p), (_, q) in zip(a.bridge.named_parameters(), b.bridge.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert [r["step"] for r in _rows(killed / "train" / "eval.jsonl")] == [2, 4, 6, 8]
    if HAS_TENSORBOARD:
        tb = killed / "train" / "tensorboard"
        curve = tensorboard_scalars(tb)["train/loss"]
        assert [s for s, _ in curve] == list(range(1, 9))
        assert [v for _, v in curve] == pytest.approx(losses(ref), rel=1e-6)
        assert [s for s, _ in tensorboard_scalars(tb)["eval/loss"]] == [2, 4, 6, 8]
        # on disk too, for any reader: the interrupted run's steps after its resume point were cut
        assert tensorboard_raw_steps(tb, "train/loss") == {s: 1 for s in range(1, 9)}
        assert tensorboard_raw_steps(tb, "eval/loss") == {s: 1 for s in (2, 4, 6, 8)}


def _saved_step(resume: Path) -> int | None:
    """The resume point's step as a resume reads it (`existing`: a writer may be between its two
    renames, when only the set-aside copy is there); None while there is none or it is being moved."""
    try:
        return json.loads((existing(resume) / "state.json").read_text())["position"]["step"]
    except (OSError, ValueError):
        return None


def _rows(path: Path) -> list[dict]:
    try:
        return [json.loads(r) for r in path.read_text().splitlines() if r.strip()] or [{"step": 0}]
    except (OSError, ValueError):
        return [{"step": 0}]


def test_resume_point_written_before_a_config_field_existed_still_resumes(tiny_world, tmp_path):
    """A resume point's config lacks the fields added since (here train.report_to, data.eval_paths):
    they take their defaults, so the run resumes instead of calling its own config different."""
    out = tmp_path / "old"
    over = stage1_overrides(tiny_world, out, **{"train.max_steps": 1})
    train(load_config(STAGE1, over))
    state_file = out / "train" / "resume" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["train"]["report_to"], state["config"]["data"]["eval_paths"]
    state_file.write_text(json.dumps(state))
    assert train(load_config(STAGE1, over)).steps == 1
    # activation checkpointing changes memory, not the numbers: a resume may turn it on
    recompute = ["train.gradient_checkpointing=true", "train.checkpoint_every=2"]
    assert train(load_config(STAGE1, [*over, *recompute])).steps == 1
    with pytest.raises(ValueError, match="different config"):
        train(load_config(STAGE1, [*over, "optim.lr=0.5"]))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_world, tmp_path):
    out = tmp_path / "nan"
    over = stage1_overrides(
        tiny_world,
        out,
        **{
            "train.max_steps": 6,
            "train.save_every": 1,
            "optim.lr": 1e30,
            "optim.grad_clip": 0.0,
            "optim.warmup_steps": 0,
        },
    )
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


def test_a_kill_between_the_checkpoint_renames_keeps_the_resume_point(
    tiny_world, tmp_path, monkeypatch, caplog
):
    """The final save sets the step-2 checkpoint (with train/resume inside) aside and dies before
    renaming the new one in: no `killed/` is left. The next start must still resume from step 2
    (it used to find nothing and restart at step 0)."""
    out = tmp_path / "killed"
    cfg = load_config(
        STAGE1, stage1_overrides(tiny_world, out, **{"train.max_steps": 4, "train.save_every": 2})
    )
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


def test_one_process_trains_twice_with_different_mixed_precision(tiny_world, tmp_path):
    """accelerate keeps one state per process; a second train() asking for another precision (stage 1
    in fp32, stage 2 in bf16, in one notebook) used to fail with "AcceleratorState has already been
    initialized"."""
    for mp in ("no", "bf16", "no"):
        out = tmp_path / mp
        train(
            load_config(
                STAGE1,
                stage1_overrides(tiny_world, out, **{"train.max_steps": 1, "train.mixed_precision": mp}),
            )
        )
        assert json.loads((out / "train" / "summary.json").read_text())["status"] == "done"
