"""Data parallelism on real processes: 2 CPU ranks over gloo give the numbers of 1 process.

The 2-process runs are launched the way a cluster launches them, with `torch.distributed.run`
(`torchrun`) and `ACCELERATE_USE_CPU=1`, so accelerate sees WORLD_SIZE=2 on a GPU-less machine
and picks DistributedType.MULTI_CPU with the gloo backend. (`accelerate launch --cpu
--num_processes 2` would not do: without an MPI hostfile it starts one plain process.)

What makes the 1- vs 2-process comparison meaningful rather than loose: both runs must see the
*same global batch* at every step, so that the loop's two distributed pieces are all that differ —
the supervised-token count reduced across ranks, and `loss * num_processes` undoing DDP's gradient
mean. Then the logged loss (the global token mean) and the pre-clip gradient norm agree up to
float32 summation order, and each check below catches a real mistake:

- normalising by a rank's own token count: loss and gradient norm double (the rank terms are
  summed, each already a mean);
- forgetting `* num_processes`: the gradient norm halves while the loss curve stays identical
  (AdamW with clipping is blind to the gradient's scale), which is why the norm is compared too;
- sharding that drops, repeats or reorders samples: `tokens_seen` (an exact integer) differs.

Stage 1 streams shards: a rank reads its own shards through its own shuffle buffer, so its
micro-batches are not a slice of the 1-process batch. The global batch is therefore made the whole
epoch (4 shards x 16 pairs = 64; 2 ranks x 16 per micro-batch x grad_accum 2), which also covers
gradient accumulation under DDP (`no_sync`). Stage 2 cuts a seeded permutation into global batches
and splits each across ranks, so any global batch size works; 10 on 192 conversations leaves a
short last batch, the case that used to reorder a multi-process epoch; its 2-process run also uses
gradient checkpointing, which must not change the numbers.
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
from safetensors.torch import load_file

from seechat.atomic import existing
from seechat.config import load_config
from seechat.data.collate import collate
from seechat.model.checkpoint import load_checkpoint
from seechat.train.data import StreamSpec, epoch_batches, load_conversation_dataset
from seechat.train.loop import train
from tests.conftest import tiny_overrides
from tests.train.tracker_readers import HAS_TENSORBOARD, tensorboard_scalars

ROOT = Path(__file__).resolve().parents[2]
STAGE1 = ROOT / "seechat" / "mini" / "recipes" / "stage1.yaml"
STAGE2 = ROOT / "seechat" / "mini" / "recipes" / "stage2.yaml"

# float32 sums over ~1-8k tokens in another order and with other padding: measured differences
# are <= 1.7e-7 relative (loss) and <= 1.1e-7 (gradient norm), and both mutations above move them
# by >= 0.5. The tolerances leave ~60x / ~900x headroom, and each curve moves by more than 100x
# LOSS_RTOL over the run (asserted), so agreement is not an artefact of a flat curve.
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-4
STEPS = 10


def stage1_overrides(w, out, **extra) -> list[str]:
    return tiny_overrides(
        w,
        out,
        **{
            "data.paths": f"{w['world']}/pairs/train/{{00000..00003}}.tar",
            "model.bridge.type": "qformer",
            "model.bridge.num_queries": 8,
            "optim.warmup_steps": 2,
            "train.max_steps": STEPS,
            **extra,
        },
    )


def stage2_overrides(w, out, **extra) -> list[str]:
    return tiny_overrides(
        w,
        out,
        **{
            "data.paths": f"{w['world']}/instruct/train.jsonl",
            "data.image_root": w["world"],
            "train.init_from": "",
            "model.bridge.type": "qformer",
            "model.bridge.num_queries": 8,
            "optim.warmup_steps": 2,
            "train.max_steps": 6,
            **extra,
        },
    )


def torchrun(recipe: Path, overrides: list[str], wait: bool = True) -> subprocess.Popen:
    """`seechat train` on 2 CPU processes over gloo, as `torchrun --nproc_per_node 2` starts it."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "seechat.cli",
        "train",
        str(recipe),
        *overrides,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if wait:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-4000:]
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(r) for r in (out / "train" / "metrics.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict:
    return json.loads((out / "train" / "summary.json").read_text())


def assert_same_curve(one: Path, two: Path) -> None:
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=LOSS_RTOL), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=GRAD_NORM_RTOL), ra["step"]
    moved = abs(a[0]["loss"] - a[-1]["loss"]) / a[0]["loss"]
    assert moved > 100 * LOSS_RTOL  # the curve moves far more than the tolerance: the check has teeth
    sa, sb = summary(one), summary(two)
    assert (sa["num_processes"], sb["num_processes"]) == (1, 2)
    assert (sb["samples_seen"], sb["tokens_seen"]) == (sa["samples_seen"], sa["tokens_seen"])


@pytest.fixture(scope="module")
def stage1(tiny_world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist_stage1")
    train(load_config(STAGE1, stage1_overrides(tiny_world, root / "one", **{"train.batch_size": 64})))
    torchrun(
        STAGE1, stage1_overrides(tiny_world, root / "two", **{"train.batch_size": 16, "train.grad_accum": 2})
    )
    return {"one": root / "one", "two": root / "two"}


@pytest.fixture(scope="module")
def stage2(tiny_world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist_stage2")
    # both evaluate the held-out conversations at the end; the 2-process run also reports to TensorBoard
    held_out = {"data.eval_paths": f"{tiny_world['world']}/instruct/val.jsonl"}
    train(
        load_config(
            STAGE2, stage2_overrides(tiny_world, root / "one", **{"train.batch_size": 10, **held_out})
        )
    )
    # the 2-process run also checkpoints the LM's layers (every other one: selective checkpointing):
    # recomputation must not change the numbers
    torchrun(
        STAGE2,
        stage2_overrides(
            tiny_world,
            root / "two",
            **{
                "train.batch_size": 5,
                "train.gradient_checkpointing": "true",
                "train.checkpoint_every": 2,
                **held_out,
                "train.report_to": "tensorboard" if HAS_TENSORBOARD else "[]",
            },
        ),
    )
    return {"one": root / "one", "two": root / "two"}


class _Lengths:
    """Stands in for a ConversationDataset: a size and a length proxy."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def length_hint(self, i: int) -> int:
        return (i * 7919) % 53


@pytest.mark.parametrize("n", [192, 37, 41])
@pytest.mark.parametrize("group_by_length", [False, True])
def test_ranks_split_the_global_batches_of_one_process(n, group_by_length):
    data = _Lengths(n)
    for global_batch, world in ((10, 2), (6, 3), (8, 4)):
        one = epoch_batches(data, StreamSpec(global_batch, 7, 0, 1), 3, group_by_length)
        shares = [
            epoch_batches(data, StreamSpec(global_batch // world, 7, r, world), 3, group_by_length)
            for r in range(world)
        ]
        assert len({len(s) for s in shares}) == 1  # every rank takes the same number of steps
        rounds = [[i for s in parts for i in s] for parts in zip(*shares, strict=True)]
        # identical global batches in identical order; only a last batch too small to give every
        # rank a sample is dropped
        assert rounds == [b for b in one if len(b) >= world]


def test_stage1_two_processes_match_one_with_the_same_global_batch(stage1):
    assert_same_curve(stage1["one"], stage1["two"])


def test_stage2_two_processes_match_one_with_the_same_global_batch(stage2):
    assert_same_curve(stage2["one"], stage2["two"])


def test_square_loss_average_two_processes_match_one(tiny_world, tmp_path):
    """train.loss_average=square: each rank weighs its rows and divides by the *global* weighted count,
    so 2 x 5 rows give one process's 10-row curve (a rank-local denominator would not)."""
    extra = {"train.loss_average": "square", "train.max_steps": 4}
    train(
        load_config(
            STAGE2, stage2_overrides(tiny_world, tmp_path / "one", **{"train.batch_size": 10, **extra})
        )
    )
    torchrun(STAGE2, stage2_overrides(tiny_world, tmp_path / "two", **{"train.batch_size": 5, **extra}))
    assert_same_curve(tmp_path / "one", tmp_path / "two")


def test_two_processes_evaluate_the_held_out_loss_of_one(stage2, tiny_world):
    """Each rank takes its share of the same global eval batches: one held-out set, one loss."""
    (one,), (two,) = (
        [json.loads(r) for r in (stage2[k] / "train" / "eval.jsonl").read_text().splitlines()]
        for k in ("one", "two")
    )
    assert one["step"] == two["step"] == 6
    # the whole validation split: 8 images x 3 conversations, plus the detection conversations
    val = [
        json.loads(r) for r in (Path(tiny_world["world"]) / "instruct" / "val.jsonl").read_text().splitlines()
    ]
    assert one["samples"] == len(val) == 24 + sum(r["kind"] == "detection" for r in val)
    assert (two["samples"], two["supervised_tokens"]) == (one["samples"], one["supervised_tokens"])
    assert two["loss"] == pytest.approx(one["loss"], rel=LOSS_RTOL)


@pytest.mark.skipif(
    not HAS_TENSORBOARD, reason="tensorboard not installed (pip install 'seechat[tensorboard]')"
)
def test_only_rank_0_writes_tracker_events(stage2):
    tb = stage2["two"] / "train" / "tensorboard"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 1  # one writer: rank 0's
    curve = tensorboard_scalars(tb)
    assert [s for s, _ in curve["train/loss"]] == [r["step"] for r in metrics(stage2["two"])]
    assert [v for _, v in curve["train/loss"]] == pytest.approx(
        [r["loss"] for r in metrics(stage2["two"])], rel=1e-6
    )
    assert [s for s, _ in curve["eval/loss"]] == [6]


def test_two_process_checkpoint_loads_in_one_process(stage2, tiny_world):
    two, one = stage2["two"], stage2["one"]
    model, processor = load_checkpoint(two)
    assert json.loads((two / "config.json").read_text())["parts"]["lm"] == "full"
    # the checkpoint holds the weights the ranks trained: those the resume point took from the live model
    live = load_file(two / "train" / "resume" / "trainable.safetensors")
    params = dict(model.named_parameters())
    assert any(k.startswith("language_model.") for k in live) and any(k.startswith("bridge.") for k in live)
    for name, value in live.items():
        assert torch.equal(params[name], value), name
    base = load_file(next(Path(tiny_world["lm"]).glob("*.safetensors")))
    lm_name = next(k for k in base if k.endswith("layers.0.mlp.up_proj.weight"))
    assert not torch.equal(params[f"language_model.{lm_name}"], base[lm_name])  # it trained

    cfg = load_config(STAGE2, stage2_overrides(tiny_world, two))
    dataset = load_conversation_dataset(cfg.data, processor)
    batch = collate([dataset[i] for i in range(4)], processor.tokenizer.pad_token_id)
    reference, _ = load_checkpoint(one)
    with torch.no_grad():
        logits = model(**batch).logits
        expected = reference(**batch).logits
    assert torch.isfinite(logits).all()
    # the same training on the same global batches: the 1-process model up to float noise
    # (measured 1.8e-7 on logits of magnitude ~0.5)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_killed_two_process_run_resumes_to_the_uninterrupted_result(stage1, tiny_world, tmp_path):
    out = tmp_path / "killed"
    over = stage1_overrides(
        tiny_world, out, **{"train.batch_size": 16, "train.grad_accum": 2, "train.save_every": 3}
    )
    proc = torchrun(STAGE1, over, wait=False)
    state = out / "train" / "resume" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[0][-4000:]
    launcher = psutil.Process(proc.pid)
    for p in [*launcher.children(recursive=True), launcher]:
        p.kill()  # both ranks and the launcher, hard, as a preempted node
    proc.communicate()
    # read as the resume reads it: a kill between a save's two renames leaves only the set-aside copy
    saved = json.loads((existing(state.parent) / state.name).read_text())
    assert saved["position"]["step"] in (3, 6, 9)
    assert len(saved["data_positions"]) == 2  # one data position per rank

    torchrun(STAGE1, over)
    reference = stage1["two"]
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(reference)]  # bit-identical
    resumed, uninterrupted = (
        load_file(out / "bridge.safetensors"),
        load_file(reference / "bridge.safetensors"),
    )
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name
