"""Loss curves from a metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_loss_curve(metrics: Path, out: Path, title: str = "") -> Path | None:
    """Loss (and learning rate on a second axis) against optimizer step; None if nothing logged."""
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="lr")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(title or "training loss")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
