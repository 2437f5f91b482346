"""Filter image–text pair shards by Chinese-CLIP similarity (`seechat data filter`).

Web pairs are noisy: many captions do not describe their image. This module scores every
(image, caption) pair of webdataset shards in the img2dataset layout with a Chinese-CLIP model
(:class:`seechat.data.scorer.ChineseClipScorer`: cosine of the L2-normalised embeddings, in
[-1, 1]) and writes the pairs that pass a :class:`KeepRule` — ``score >= threshold`` or the
``round(top_fraction × n_scored)`` best — as new shards in the same layout.

Two passes over the input, so memory holds one float per sample, not the data set:

1. **score**: read every sample (the same structural checks as training, :func:`seechat.data.pairs
   .check_sample`, then a full decode), score readable pairs in batches; a corrupt or unreadable
   sample, or one larger than ``max_sample_bytes`` (not read), is recorded with its key and
   reason, never fatal, never silently dropped;
2. **write**: decide what is kept, then re-read the shards and copy kept samples unchanged (image
   bytes, ``.txt``, ``.json`` with ``clip_score`` added) through :class:`seechat.data.shards
   .ShardWriter` (size-balanced shards; corrupt samples are listed as its failures).

The output directory is built under a temporary name and renamed into place
(:func:`seechat.atomic.atomic_directory`); besides the shards and the writer's ``stats.json`` it
holds ``scores.jsonl`` (every sample: shard, key, score or null, kept, error),
``filter_stats.json`` (counts, rule, threshold used, score quantiles, corrupt keys) and
``score_histogram.png``.

What this module is not: a de-duplicator or a language filter, and not a downloader. Members other
than the image, ``.txt`` and ``.json`` are not copied, and a non-JPEG image (``.png``/``.webp``) is
re-encoded as ``KEY.jpg`` (quality 95) because the writer's layout is JPEG; ``filter_stats.json``
counts those. A damaged tar stream is read up to the damage (see :mod:`seechat.data.pairs`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from seechat.atomic import atomic_directory
from seechat.data.jsonl import dumps_line
from seechat.data.pairs import CorruptSample, check_sample, decode_rgb, image_ext
from seechat.data.scorer import ChineseClipScorer
from seechat.data.shards import (
    DEFAULT_MAX_SAMPLE_BYTES,
    MAX_LISTED_FAILURES,
    ShardWriter,
    encode_image,
    expand_shards,
    iter_tar_member_names,
    iter_tar_samples,
)

logger = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"
STATS_FILE = "filter_stats.json"
HISTOGRAM_FILE = "score_histogram.png"
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
JPEG_EXTS = ("jpg", "jpeg")


@dataclass(frozen=True)
class KeepRule:
    """Exactly one of: keep pairs with ``score >= threshold``; keep the ``top_fraction`` best."""

    threshold: float | None = None
    top_fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.top_fraction is None):
            raise ValueError(
                "give exactly one of threshold (keep score >= T) or top_fraction (keep the best F)"
            )
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold}")
        if self.top_fraction is not None and not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")

    def keep_mask(self, scores: np.ndarray) -> tuple[np.ndarray, float | None]:
        """(kept flags, threshold used) for scores (N,), NaN = corrupt (never kept).

        Top fraction keeps exactly ``round(F × n_scored)`` pairs, best first, ties broken by input
        order; the threshold it reports is the lowest kept score (None when nothing is kept).
        """
        valid = ~np.isnan(scores)
        if self.threshold is not None:
            return valid & (np.nan_to_num(scores, nan=-np.inf) >= self.threshold), self.threshold
        n_keep = int(math.floor(self.top_fraction * int(valid.sum()) + 0.5))
        order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:n_keep]
        keep = np.zeros(len(scores), dtype=bool)
        keep[order] = True
        return keep, (float(scores[order].min()) if n_keep else None)

    def describe(self) -> dict[str, float]:
        return (
            {"threshold": self.threshold}
            if self.threshold is not None
            else {"top_fraction": self.top_fraction}
        )


@dataclass
class FilterReport:
    """What a filter run did; ``to_dict`` is what ``filter_stats.json`` holds."""

    n_in: int = 0  # samples read (scored + corrupt)
    n_scored: int = 0
    n_kept: int = 0
    n_corrupt: int = 0
    corrupt: list[dict[str, str]] = field(default_factory=list)  # [{shard, key, reason}], capped
    rule: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None  # the score cut actually applied
    quantiles: dict[str, float] = field(default_factory=dict)
    mean: float | None = None
    n_reencoded: int = 0  # non-JPEG images written as JPEG
    shards_in: int = 0
    shards_out: int = 0
    scorer: str = ""
    text_field: str = "txt"
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_in": self.n_in,
            "n_scored": self.n_scored,
            "n_kept": self.n_kept,
            "kept_fraction_of_scored": self.n_kept / self.n_scored if self.n_scored else None,
            "n_corrupt": self.n_corrupt,
            "corrupt": self.corrupt,
            "corrupt_truncated": self.n_corrupt > len(self.corrupt),
            "rule": self.rule,
            "threshold": self.threshold,
            "score_quantiles": self.quantiles,
            "score_mean": self.mean,
            "n_reencoded_to_jpeg": self.n_reencoded,
            "shards_in": self.shards_in,
            "shards_out": self.shards_out,
            "scorer": self.scorer,
            "text_field": self.text_field,
            "seconds": round(self.seconds, 3),
        }


# -- pass 1: read and score -----------------------------------------------------------------------


@dataclass
class _Read:
    """One sample as read for scoring: a decoded image and its text, or why it is unusable."""

    shard: int
    index: int  # position in its shard
    key: str
    image: Image.Image | None
    text: str
    reason: str | None


def _read(shard: int, index: int, key: str, members: dict, text_field: str) -> _Read:
    try:
        encoded = check_sample(key, members, text_field)
    except CorruptSample as e:
        return _Read(shard, index, key, None, "", str(e))
    try:
        image = decode_rgb(encoded.image_bytes)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return _Read(shard, index, key, None, "", f"image decode failed ({type(e).__name__}: {e})")
    return _Read(shard, index, key, image, encoded.text, None)


class _ShardReader(IterableDataset):
    """Every sample of every shard, in shard order; DataLoader workers take whole shards."""

    def __init__(self, shards: Sequence[str], text_field: str, max_sample_bytes: int) -> None:
        super().__init__()
        self.shards = list(shards)
        self.text_field = text_field
        self.max_sample_bytes = max_sample_bytes

    def __iter__(self) -> Iterator[_Read]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for s in range(worker, len(self.shards), workers):
            for i, (key, members) in enumerate(iter_tar_samples(self.shards[s], self.max_sample_bytes)):
                yield _read(s, i, key, members, self.text_field)


def count_samples(shards: Sequence[str]) -> int:
    """Samples in the shards, from tar headers only (for the progress bar's ETA)."""
    return sum(1 for shard in shards for _ in iter_tar_member_names(shard))


def _progress(enabled: bool, total: int | None, desc: str, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, smoothing=0.1, dynamic_ncols=True)


def score_shards(
    shards: Sequence[str],
    scorer: ChineseClipScorer,
    *,
    text_field: str = "txt",
    num_workers: int = 0,
    progress: bool = False,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
) -> tuple[list[np.ndarray], dict[tuple[int, int], dict[str, str]]]:
    """Score every sample: per shard a float32 array in sample order (NaN = corrupt), and the
    corrupt samples as {(shard index, sample index): {"key", "reason"}}.

    ``num_workers > 0`` reads and decodes in that many DataLoader processes (whole shards each);
    the scorer (tokenise, preprocess, forward) runs in this process in batches of
    ``scorer.batch_size``.
    """
    reader = _ShardReader(shards, text_field, max_sample_bytes)
    items: Iterator[_Read] = (
        iter(DataLoader(reader, batch_size=None, num_workers=num_workers))
        if num_workers > 0
        else iter(reader)
    )
    per_shard: list[list[float]] = [[] for _ in shards]
    corrupt: dict[tuple[int, int], dict[str, str]] = {}
    bar = _progress(progress, count_samples(shards) if progress else None, "score", "pair")
    batch: list[_Read] = []

    def flush() -> None:
        scores = scorer.score([r.image for r in batch], [r.text for r in batch]).tolist()
        for r, score in zip(batch, scores, strict=True):
            per_shard[r.shard][r.index] = score
        bar.update(len(batch))
        batch.clear()

    for r in items:
        slots = per_shard[r.shard]
        if len(slots) != r.index:  # a shard is read by one worker, in order
            raise RuntimeError(f"internal: sample {r.index} of shard {shards[r.shard]} out of order")
        slots.append(math.nan)
        if r.reason is not None:
            logger.warning("corrupt sample %r in %s: %s", r.key, shards[r.shard], r.reason)
            corrupt[(r.shard, r.index)] = {"key": r.key, "reason": r.reason}
            bar.update(1)
            bar.set_postfix(corrupt=len(corrupt), refresh=False)
            continue
        batch.append(r)
        if len(batch) >= scorer.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    return [np.asarray(s, dtype=np.float32) for s in per_shard], corrupt


# -- pass 2: decide and write -----------------------------------------------------------------------


def _raw_text(members: dict[str, bytes], fallback: str) -> str:
    """The original ``.txt`` member (kept verbatim), else the scored text."""
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="replace")
    return fallback


def _write_kept(
    shards: Sequence[str],
    per_shard: list[np.ndarray],
    keep: list[np.ndarray],
    corrupt: dict[tuple[int, int], dict[str, str]],
    writer: ShardWriter,
    scores_out: Any,
    text_field: str,
    progress: bool,
    max_sample_bytes: int,
) -> int:
    """Copy kept samples into ``writer`` and write every sample's row to ``scores_out``; returns
    the number of images re-encoded to JPEG."""
    reencoded = 0
    bar = _progress(progress, int(sum(k.sum() for k in keep)), "write", "pair")
    for s, shard in enumerate(shards):
        n = 0
        name = os.path.basename(shard)
        for i, (key, members) in enumerate(iter_tar_samples(shard, max_sample_bytes)):
            n += 1
            if i >= len(per_shard[s]):
                raise RuntimeError(f"{shard} changed while filtering (more samples than when scored)")
            row: dict[str, Any] = {"shard": name, "key": key}
            bad = corrupt.get((s, i))
            if bad is not None:
                if bad["key"] != key:
                    raise RuntimeError(f"{shard} changed while filtering (key {key!r} != {bad['key']!r})")
                writer.add_failure(key, bad["reason"])
                row.update(score=None, kept=False, error=bad["reason"])
                scores_out.write(dumps_line(row))
                continue
            score = float(per_shard[s][i])
            kept = bool(keep[s][i])
            row.update(score=round(score, 6), kept=kept)
            scores_out.write(dumps_line(row))
            if not kept:
                continue
            encoded = check_sample(key, members, text_field)  # passed in pass 1
            image = encoded.image_bytes
            if image_ext(members) not in JPEG_EXTS:
                image = encode_image(image, quality=95)
                reencoded += 1
            meta = {**encoded.meta, "clip_score": round(score, 6)}
            writer.write(key, image, _raw_text(members, encoded.text), meta)
            bar.update(1)
        if n != len(per_shard[s]):
            raise RuntimeError(
                f"{shard} changed while filtering ({n} samples now, {len(per_shard[s])} scored)"
            )
    bar.close()
    return reencoded


def plot_score_histogram(
    scores: np.ndarray, threshold: float | None, out: str | os.PathLike[str], title: str = ""
) -> Path:
    """Histogram of the scores (finite values) with a vertical line at ``threshold``; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = scores[np.isfinite(scores)]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if len(values):
        ax.hist(values, bins=min(60, max(5, len(values) // 5)), color="tab:blue", alpha=0.8)
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.4f}")
        ax.legend()
    ax.set_xlabel("Chinese-CLIP cosine(image, caption)")
    ax.set_ylabel("pairs")
    ax.set_title(title or "pair scores")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return Path(out)


def filter_shards(
    shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    scorer: ChineseClipScorer,
    rule: KeepRule,
    *,
    text_field: str = "txt",
    max_samples_per_shard: int = 10_000,
    max_bytes_per_shard: int = 1 << 30,
    prefix: str = "",
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
) -> FilterReport:
    """Score the pairs of ``shards`` (paths, globs or brace patterns) and write those ``rule``
    keeps to ``out_dir``, atomically; see the module docstring for the files written."""
    if text_field != "txt" and not text_field.startswith("json:"):
        raise ValueError(f"text_field must be 'txt' or 'json:<field>', got {text_field!r}")
    paths = expand_shards(shards)
    out = Path(out_dir)
    inside = [p for p in paths if Path(p).resolve().is_relative_to(out.resolve())]
    if inside:
        raise ValueError(
            f"input shard {inside[0]} is inside the output directory {out}; choose another output"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    start = time.time()
    per_shard, corrupt = score_shards(
        paths,
        scorer,
        text_field=text_field,
        num_workers=num_workers,
        progress=progress,
        max_sample_bytes=max_sample_bytes,
    )
    flat = np.concatenate(per_shard) if per_shard else np.zeros(0, dtype=np.float32)
    mask, threshold = rule.keep_mask(flat)
    offsets = np.cumsum([0] + [len(s) for s in per_shard])
    keep = [mask[offsets[s] : offsets[s + 1]] for s in range(len(per_shard))]

    report = FilterReport(
        n_in=len(flat),
        n_corrupt=len(corrupt),
        rule=rule.describe(),
        threshold=threshold,
        shards_in=len(paths),
        scorer=scorer.name,
        text_field=text_field,
    )
    valid = flat[~np.isnan(flat)].astype(np.float64)
    report.n_scored = len(valid)
    report.n_kept = int(mask.sum())
    if len(valid):
        report.quantiles = {
            f"p{round(q * 100)}": float(v)
            for q, v in zip(QUANTILES, np.quantile(valid, QUANTILES), strict=True)
        }
        report.mean = float(valid.mean())
    for (s, _), bad in sorted(corrupt.items())[:MAX_LISTED_FAILURES]:
        report.corrupt.append({"shard": os.path.basename(paths[s]), **bad})

    with atomic_directory(out) as tmp:
        with (
            ShardWriter(tmp, max_samples_per_shard, max_bytes_per_shard, prefix) as writer,
            (tmp / SCORES_FILE).open("w", encoding="utf-8") as scores_out,
        ):
            report.n_reencoded = _write_kept(
                paths, per_shard, keep, corrupt, writer, scores_out, text_field, progress, max_sample_bytes
            )
        report.shards_out = len(writer.stats.shards)
        title = f"{report.n_kept} of {report.n_scored} scored pairs kept ({report.n_corrupt} corrupt)"
        plot_score_histogram(flat, threshold, tmp / HISTOGRAM_FILE, title)
        report.seconds = time.time() - start
        (tmp / STATS_FILE).write_text(
            json.dumps(report.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8"
        )
    return report
