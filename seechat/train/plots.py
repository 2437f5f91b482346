"""Loss curves from a metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from seechat.data.jsonl import read_jsonl


def plot_loss_curve(
    metrics: Path, out: Path, title: str = "", eval_metrics: Path | None = None
) -> Path | None:
    """Loss (and learning rate on a second axis) against optimizer step, plus the held-out loss
    when `eval_metrics` (eval.jsonl) exists; None if nothing logged."""
    rows = read_jsonl(metrics)
    evals = read_jsonl(eval_metrics) if eval_metrics is not None and Path(eval_metrics).is_file() else []
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["loss"] for r in evals],
            "o-",
            color="tab:green",
            label="held-out loss",
        )
        ax.legend(loc="upper right")
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


def plot_score_curve(metrics: Path, key: str, out: Path, title: str = "") -> Path | None:
    """A held-out score logged along the way (rows of `metrics` holding `key`, and optionally
    `<key>_by_type`: {type: score}) against optimizer step, in percent; None if no row has it."""
    rows = [r for r in read_jsonl(metrics) if key in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for kind in sorted(rows[-1].get(f"{key}_by_type", {})):
        ax.plot(steps, [100 * r[f"{key}_by_type"].get(kind, 0.0) for r in rows], alpha=0.5, label=kind)
    ax.plot(steps, [100 * r[key] for r in rows], "o-", color="black", linewidth=2, label="overall")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{key} (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small", ncol=2)
    ax.set_title(title or key)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
