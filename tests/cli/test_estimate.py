"""`seechat estimate`: the printed memory, time and assumptions agree with `seechat.estimate`."""

from __future__ import annotations

import pytest

from seechat.cli import main
from seechat.config import load_config
from seechat.estimate import (
    GIB,
    Setup,
    estimate,
)
from tests.test_estimate import CONFIGS


def test_cli_prints_memory_time_and_assumptions(capsys):
    recipe = str(CONFIGS / "reference" / "stage2_qformer_qwen2.5-7b.yaml")
    assert (
        main(["estimate", recipe, "--gpus", "8", "--gpu", "h100", "--strategy", "zero3", "--mfu", "0.5"]) == 0
    )
    out = capsys.readouterr().out
    for text in (
        "8 x H100 SXM 80GB, zero3",
        "7615.6 M",
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "gradient checkpointing on (off:",
        "fits",
        "GPU-hours",
        "MFU 50%",
        "157,712 conversations",
    ):
        assert text in out, text
    cfg = load_config(recipe)
    e = estimate(cfg, Setup(gpus=8, gpu="h100", strategy="zero3", mfu=0.5))
    assert f"{e.total_bytes / GIB:.1f} GiB" in out
    # the time is FLOPs / (GPUs x peak x MFU)
    assert e.wall_seconds == pytest.approx(157_712 * sum(e.flops_per_sample.values()) / (8 * 989e12 * 0.5))
    with pytest.raises(SystemExit):
        main(["estimate", recipe, "--gpu", "v100"])


def test_the_deep_fusion_reference_recipe_fits_an_h100_under_fsdp(capsys):
    recipe = str(CONFIGS / "reference" / "stage2_deep_qwen2.5-7b.yaml")
    assert main(["estimate", recipe, "--gpus", "8", "--strategy", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "experts    6165.8 M  full" in out and "fits" in out and "deep fusion:" in out


def test_overrides_may_follow_options(capsys):
    """docs/distributed.md writes `seechat estimate RECIPE --strategy fsdp --mfu 0.35 key=value`:
    overrides after options (plain argparse refused them there: "unrecognized arguments")."""
    recipe = str(CONFIGS / "reference" / "stage2_qformer_qwen2.5-7b.yaml")
    argv = ["estimate", recipe, "--strategy", "fsdp", "train.gradient_checkpointing=true", "--mfu", "0.35"]
    assert main([*argv, "train.checkpoint_every=2"]) == 0
    assert "gradient checkpointing on for 14 of 28 layers (every 2)" in capsys.readouterr().out
