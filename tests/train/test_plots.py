"""The plotters: the loss curve (training loop and mini-expert recipes) and a held-out score's curve."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from seechat.data.jsonl import write_jsonl
from seechat.train.plots import plot_loss_curve, plot_score_curve


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


def test_score_curve_plots_only_the_rows_that_hold_the_score(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": 1.0, "lr": 0.001} for s in range(10)]
    rows[4]["exam"], rows[4]["exam_by_type"] = 0.3, {"colour": 0.5, "count": 0.1}
    rows[9]["exam"], rows[9]["exam_by_type"] = 0.6, {"colour": 0.9, "count": 0.3}
    write_jsonl(tmp_path / "metrics.jsonl", rows)
    out = plot_score_curve(tmp_path / "metrics.jsonl", "exam", tmp_path / "exam.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300
    assert plot_score_curve(tmp_path / "metrics.jsonl", "absent", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
