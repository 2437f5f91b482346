"""The training-step benchmark's rehearsal on the CPU: tiny shapes, both stages, and stage 2 under
each activation-checkpointing choice it is asked to time."""

from __future__ import annotations

from benchmarks.bench_train_step import main


def test_tiny_rehearsal_times_each_stage_and_checkpointing_choice():
    args = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1"]
    rows = main([*args, "--s1-batches", "2", "--s2-batches", "2", "--s2-checkpoint-every", "1,2,0"])
    assert [(r["stage"], r["checkpoint_every"], r["recomputed_layers"]) for r in rows] == [
        ("stage1", 0, 0),
        ("stage2", 1, 2),  # the tiny LM has 2 layers
        ("stage2", 2, 1),
        ("stage2", 0, 0),
    ]
    assert all(r["step_s"] > 0 and r["samples_per_s"] > 0 for r in rows)
