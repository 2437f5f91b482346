"""The training-step benchmark's rehearsal on the CPU: tiny shapes, both stages, stage 2 under each
activation-checkpointing choice it is asked to time, samples of different lengths padded and
padding-free, and the transformers LLaVA peer on the same modules."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_train_step as bench
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


def test_tiny_rehearsal_times_samples_of_different_lengths_padded_and_padding_free():
    args = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--stages", "2"]
    rows = main([*args, "--s2-batches", "4", "--s2-text-range", "8,40", "--s2-padding-free", "0,1"])
    assert [r["padding_free"] for r in rows] == [False, True]
    padded, free = rows
    assert padded["text_range"] == free["text_range"] == [8, 40]
    assert padded["mean_seq_len"] == free["mean_seq_len"] < padded["seq_len"]  # the same samples
    assert padded["padding"] > 0 and free["padding"] == 0.0
    assert padded["tokens_per_s"] > 0 and free["tokens_per_s"] > 0


def test_tiny_rehearsal_accumulates_micro_batches_per_optimizer_step():
    args = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--stages", "2"]
    (row,) = main([*args, "--s2-batches", "2", "--grad-accum", "3"])
    assert row["grad_accum"] == 3
    assert row["samples_per_s"] == pytest.approx(6 / row["step_s"], rel=0.02)  # 3 x 2 samples a step


def test_the_llava_peer_computes_seechats_loss_on_the_same_modules():
    """--peer: transformers' LLaVA built around the seechat model's own modules gives the same loss
    on the same batch (so the two rows time the same computation), and is timed beside it."""
    torch.manual_seed(0)
    model = bench.build(bench.tiny_mlp_preset(), torch.device("cpu"), torch.float32).eval()
    llava = bench.llava_view(model, stop_token_ids=[], pad_token_id=0).eval()
    data = bench.batch(model, [20, 33, 9], torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(bench.llava_loss(llava)(data), bench.seechat_loss(model)(data))
    args = ["--preset", "tiny-mlp", "--device", "cpu", "--steps", "1", "--warmup", "0", "--peer"]
    rows = main([*args, "--s1-batches", "2", "--s2-batches", "2", "--s2-padding-free", "0,1"])
    assert [(r["stage"], r["impl"], r["padding_free"]) for r in rows] == [
        ("stage1", "seechat", False),
        ("stage1", "transformers-llava", False),
        ("stage2", "seechat", False),
        ("stage2", "transformers-llava", False),
        ("stage2", "seechat", True),  # the peer pads, and is timed once
    ]


def test_peer_needs_a_llava_shaped_preset(capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--device", "cpu", "--peer"])
    assert "mlp2x_gelu" in capsys.readouterr().err


def test_tiny_rehearsal_times_compiled_layers():
    """--compile: the LM layers' parts compiled first (train.compile); the rows say so. Not with --peer."""
    args = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--stages", "2"]
    (row,) = main([*args, "--s2-batches", "2", "--compile"])
    assert row["compiled"] and row["step_s"] > 0
    with pytest.raises(SystemExit):
        main([*args, "--compile", "--peer", "--preset", "tiny-mlp"])
