"""The one loss-curve plotter (training loop and mini-expert recipes)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from seechat.data.jsonl import write_jsonl
from seechat.train.plots import plot_loss_curve


def test_plots_loss_lr_and_held_out_loss(tmp_path: Path) -> None:
    metrics, evals = tmp_path / "metrics.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(metrics, [{"step": s, "loss": 3.0 / (s + 1), "lr": 0.001} for s in range(20)])
    write_jsonl(evals, [{"step": 10, "loss": 0.5}, {"step": 19, "loss": 0.4}])
    out = plot_loss_curve(metrics, tmp_path / "loss.png", "run", eval_metrics=evals)
    assert out == tmp_path / "loss.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300


def test_nothing_logged_draws_nothing(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
