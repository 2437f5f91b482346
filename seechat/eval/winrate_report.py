"""Report files of the caption win-rate experiment.

What this module is: :func:`write_report`, which turns a ``WinRateResult`` into

- ``report.md``     — summary table, chart, head-to-head matrix, tie rule, problems with examples;
- ``winrate.png``   — bar chart: methods on x, win rate with bootstrap-CI error bars, values labelled;
- ``per_image.csv`` — one row per listed image: status, each method's score, the winner(s);
- ``problems.csv``  — every problem found in the inputs;
- ``summary.json``  — the numbers above, machine-readable (NaN → null).

What it is not: any computation of the numbers (``seechat.eval.winrate`` does that). Charts are
drawn on a bare matplotlib ``Figure`` with the Agg canvas, never pyplot, so no global backend
state is touched. Method names are drawn as given; non-ASCII names need a font that has them.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from seechat.eval.clipscore import CLIPSCORE_WEIGHT
from seechat.eval.winrate_result import PROBLEM_KINDS, TIE_RULE, WinRateResult

__all__ = ["write_report"]

MAX_EXAMPLES = 10  # problems listed per kind in report.md; problems.csv has all of them


def write_report(result: WinRateResult, out_dir: Path) -> dict[str, Path]:
    """Write all report files into ``out_dir`` (created if needed); returns their paths by role."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "report": out_dir / "report.md",
        "chart": out_dir / "winrate.png",
        "per_image": out_dir / "per_image.csv",
        "problems": out_dir / "problems.csv",
        "summary": out_dir / "summary.json",
    }
    _write_chart(result, files["chart"])
    _write_per_image(result, files["per_image"])
    _write_problems(result, files["problems"])
    files["summary"].write_text(
        json.dumps(_summary(result), ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    files["report"].write_text(_markdown(result, files), encoding="utf-8")
    return files


def _num(value: float, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _json_num(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


# --- markdown ----------------------------------------------------------------------------------


def _markdown(result: WinRateResult, files: dict[str, Path]) -> str:
    pct = f"{result.confidence:.0%}"
    lines = [
        "# Caption win rate",
        "",
        f"Scorer: `{result.scorer or 'unknown'}` · images listed: {len(result.image_ids)} · "
        f"scored: {result.n_scored} · bootstrap: {result.n_bootstrap} resamples of images, "
        f"seed {result.seed}, "
        f"{pct} percentile CI",
        "",
        f"| method | win rate | {pct} CI | wins | mean cosine | mean CLIPScore | captions scored |",
        "|---|---:|:---:|---:|---:|---:|---:|",
    ]
    clip_scores = CLIPSCORE_WEIGHT * np.clip(result.scores[result.scored], 0, None)  # NaN stays NaN
    for j, (method, row) in enumerate(result.summary().items()):
        mean_clip = float(np.nanmean(clip_scores[:, j])) if row["n_captions"] else math.nan
        lines.append(
            f"| {method} | {_num(row['win_rate'])} | [{_num(row['ci_low'])}, {_num(row['ci_high'])}] | "
            f"{row['wins']:g} | {_num(row['mean_score'])} | {_num(mean_clip)} | "
            f"{row['n_captions']}/{result.n_scored} |"
        )
    lines += ["", f"![win rate]({files['chart'].name})", "", "## Head to head", ""]
    lines += [
        "Fraction of the images both methods have a caption for on which the row method's caption "
        "scores higher than the column method's; ties count 0.5.",
        "",
        "| | " + " | ".join(result.methods) + " |",
        "|---|" + "---:|" * len(result.methods),
    ]
    for i, method in enumerate(result.methods):
        lines.append(f"| {method} | " + " | ".join(_num(v) for v in result.head_to_head[i]) + " |")
    lines += ["", "## How winners are decided", "", TIE_RULE, ""]
    lines += _problem_lines(result, PROBLEM_KINDS)
    lines += [
        "",
        f"Files: [{files['per_image'].name}]({files['per_image'].name}) (every image's scores), "
        f"[{files['problems'].name}]({files['problems'].name}), "
        f"[{files['summary'].name}]({files['summary'].name}).",
        "",
    ]
    return "\n".join(lines)


def _problem_lines(result: WinRateResult, kinds: dict[str, str]) -> list[str]:
    counts = Counter(p.kind for p in result.problems)
    lines = [f"## Problems ({len(result.problems)})", ""]
    if not result.problems:
        return lines + [
            "None: every listed image was readable and every method had exactly one caption for it."
        ]
    lines += ["| kind | count | what it means |", "|---|---:|---|"]
    lines += [f"| {kind} | {counts[kind]} | {kinds[kind]} |" for kind in kinds if counts[kind]]
    for kind in (k for k in kinds if counts[k]):
        examples = [p for p in result.problems if p.kind == kind][:MAX_EXAMPLES]
        lines += ["", f"**{kind}**", ""]
        for p in examples:
            where = " · ".join(part for part in (f"`{p.image}`" if p.image else "", p.method) if part)
            lines.append(f"- {where}{': ' + p.detail if p.detail else ''}")
        if counts[kind] > len(examples):
            lines.append(f"- … and {counts[kind] - len(examples)} more (see problems.csv)")
    return lines


# --- csv / json --------------------------------------------------------------------------------


def _write_per_image(result: WinRateResult, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "status", *result.methods, "winner"])
        for i, image_id in enumerate(result.image_ids):
            scores = result.scores[i]
            winners = [m for m, w in zip(result.methods, result.wins[i], strict=True) if w > 0]
            writer.writerow(
                [
                    image_id,
                    result.image_status[i],
                    *("" if math.isnan(s) else f"{s:.6f}" for s in scores),
                    "|".join(winners),
                ]
            )


def _write_problems(result: WinRateResult, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "image", "method", "detail"])
        writer.writerows([p.kind, p.image, p.method, p.detail] for p in result.problems)


def _summary(result: WinRateResult) -> dict:
    return {
        "scorer": result.scorer,
        "n_images_listed": len(result.image_ids),
        "n_images_scored": result.n_scored,
        "n_bootstrap": result.n_bootstrap,
        "seed": result.seed,
        "confidence": result.confidence,
        "methods": {m: {k: _json_num(v) for k, v in row.items()} for m, row in result.summary().items()},
        "head_to_head": {
            row: {col: _json_num(result.head_to_head[i, j]) for j, col in enumerate(result.methods)}
            for i, row in enumerate(result.methods)
        },
        "problems": dict(Counter(p.kind for p in result.problems)),
    }


# --- chart -------------------------------------------------------------------------------------


def _write_chart(result: WinRateResult, path: Path) -> None:
    methods, rate = result.methods, result.win_rate
    x = np.arange(len(methods))
    fig = Figure(figsize=(max(4.0, 1.1 * len(methods) + 2.0), 4.0), dpi=100)
    FigureCanvasAgg(fig)  # attaches the Agg canvas that savefig renders with
    ax = fig.add_subplot()
    has_ci = not np.isnan(result.ci_low).any()
    yerr = np.vstack([rate - result.ci_low, result.ci_high - rate]) if has_ci else None
    ax.bar(x, np.nan_to_num(rate), yerr=yerr, capsize=5, color="#4C72B0", ecolor="#333333")
    tops = result.ci_high if has_ci else rate
    for xi, value, top in zip(x, rate, tops, strict=True):
        ax.text(xi, np.nan_to_num(top) + 0.02, _num(value), ha="center", va="bottom", fontsize=9)
    if methods:
        ax.axhline(1 / len(methods), color="#999999", linestyle="--", linewidth=1, label="equal split")
        ax.legend(loc="best", fontsize=8, frameon=False)
    long_names = max((len(m) for m in methods), default=0) > 10
    ax.set_xticks(x, methods, rotation=20 if long_names else 0, ha="right" if long_names else "center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("win rate")
    ci_text = f", {result.confidence:.0%} bootstrap CI" if has_ci else ""
    ax.set_title(f"Caption win rate (n = {result.n_scored} images{ci_text})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
