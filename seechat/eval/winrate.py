"""The caption win-rate experiment: which captioning method describes each held-out image best?

What this module is:

- :func:`compute_winrate` — the arithmetic on a score table (images × methods, NaN = missing):
  winners, win rates with a seeded percentile-bootstrap CI over images, mean scores and the
  pairwise head-to-head matrix. No I/O.
- :func:`run_winrate` — the end-to-end experiment: read each method's captions (JSONL rows
  ``{"image": ..., "caption": ...}``), load the images, score every caption against its image with
  a Chinese-CLIP scorer (cosine similarity), compute the table and write the report files
  (``seechat.eval.winrate_report``). Every input problem is listed, never silently dropped.
- Image sources for it (a folder, a JSONL list, shards) are in ``seechat.data.image_sources``.

Scoring and tie rule (see :data:`TIE_RULE`): a method's score on an image is the cosine between
the image and its caption. The winner of an image is the method with the highest score; when k
methods tie for the highest score, each gets 1/k of a win, so per-image wins sum to 1 and the win
rates of all methods sum to 1. A method with no caption for an image scores NaN on it: it cannot
win that image, and the other methods still compete for it. Images no method has a caption for,
and unreadable images, are left out of every statistic (and listed as problems). Identical caption
strings are embedded once, so two methods that wrote the same caption tie exactly.

What it is not: a captioner (produce the JSONL files with the inference tools first), and not a
human preference study — the judge is the scorer model, with its biases.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path, PurePath
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from seechat.data.jsonl import enumerate_jsonl
from seechat.eval.winrate_report import write_report
from seechat.eval.winrate_result import PROBLEM_KINDS, TIE_RULE, Problem, WinRateResult

__all__ = [
    "PROBLEM_KINDS",
    "TIE_RULE",
    "ImageTextEmbedder",
    "Problem",
    "WinRateResult",
    "compute_winrate",
    "fractional_wins",
    "head_to_head",
    "load_captions",
    "run_winrate",
]

log = logging.getLogger(__name__)


# --- the arithmetic ----------------------------------------------------------------------------


def fractional_wins(scores: np.ndarray, *, tie_tol: float = 0.0) -> np.ndarray:
    """(I, M) scores -> (I, M) wins: 1/k to each of the k methods within ``tie_tol`` of the row max.

    NaN never wins; a row that is all NaN gets no wins.
    """
    valid = ~np.isnan(scores)
    filled = np.where(valid, scores, -np.inf)
    best = filled.max(axis=1, keepdims=True)  # (I, 1); -inf for an all-NaN row
    is_best = valid & (filled >= best - tie_tol)
    n_best = is_best.sum(axis=1, keepdims=True)
    return np.where(n_best > 0, is_best / np.maximum(n_best, 1), 0.0)


def head_to_head(scores: np.ndarray, *, tie_tol: float = 0.0) -> np.ndarray:
    """(I, M) scores -> (M, M): fraction of images, among those both methods scored, where the row
    method beats the column method (ties within ``tie_tol`` count 0.5). NaN where no image is shared."""
    a, b = scores[:, :, None], scores[:, None, :]  # (I, M, 1), (I, 1, M)
    both = ~np.isnan(a) & ~np.isnan(b)  # (I, M, M)
    diff = np.where(both, a - b, 0.0)
    points = np.where(np.abs(diff) <= tie_tol, 0.5, (diff > 0).astype(float))
    shared = both.sum(axis=0)
    matrix = np.divide(
        (points * both).sum(axis=0), shared, out=np.full(shared.shape, np.nan), where=shared > 0
    )
    np.fill_diagonal(matrix, np.nan)
    return matrix


def _bootstrap_ci(
    wins: np.ndarray, n_bootstrap: int, seed: int, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap over images of the mean of ``wins`` (n, M) -> (M,), (M,)."""
    n, m = wins.shape
    if n == 0 or n_bootstrap <= 0:
        return np.full(m, np.nan), np.full(m, np.nan)
    rng = np.random.default_rng(seed)
    rates = np.empty((n_bootstrap, m))
    chunk = max(1, 2**22 // (n * max(m, 1)))  # bounds the (chunk, n, M) gather below to ~32 MB
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        rates[start : start + size] = wins[rng.integers(0, n, size=(size, n))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(rates, [tail, 100 - tail], axis=0)
    return low, high


def compute_winrate(
    scores: np.ndarray,
    methods: Sequence[str],
    image_ids: Sequence[str] | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    tie_tol: float = 0.0,
) -> WinRateResult:
    """Win rates, bootstrap CIs, mean scores and head-to-head from an (images × methods) table."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(methods):
        raise ValueError(f"scores must be (images, {len(methods)} methods), got shape {scores.shape}")
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"method names must be unique and at least one, got {list(methods)}")
    ids = [str(i) for i in range(len(scores))] if image_ids is None else list(image_ids)
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} image ids for {len(scores)} score rows")
    scored = ~np.isnan(scores).all(axis=1)
    wins = fractional_wins(scores, tie_tol=tie_tol)
    n = int(scored.sum())
    win_rate = wins[scored].sum(axis=0) / n if n else np.full(len(methods), np.nan)
    low, high = _bootstrap_ci(wins[scored], n_bootstrap, seed, confidence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice": a method with no captions
        mean_score = np.nanmean(scores[scored], axis=0) if n else np.full(len(methods), np.nan)
    return WinRateResult(
        methods=list(methods),
        image_ids=ids,
        scores=scores,
        wins=wins,
        scored=scored,
        win_rate=win_rate,
        ci_low=low,
        ci_high=high,
        mean_score=mean_score,
        head_to_head=head_to_head(scores, tie_tol=tie_tol),
        n_bootstrap=n_bootstrap,
        seed=seed,
        confidence=confidence,
        image_status=["ok" if s else "no_scores" for s in scored],
    )


# --- inputs: captions and images ---------------------------------------------------------------


def load_captions(path: str | Path, method: str) -> tuple[dict[str, str], list[Problem]]:
    """Read a method's captions JSONL (``{"image": ..., "caption": ...}`` per line).

    Returns image -> caption (first row wins) and the problems found: malformed lines, duplicate
    image rows, empty captions.
    """
    captions: dict[str, str] = {}
    seen_rows: dict[str, int] = {}
    problems: list[Problem] = []

    def bad_row(line_no: int, line: str, _err: Exception | None = None) -> None:
        problems.append(Problem("bad_caption_row", "", method, f"{path}:{line_no}: {line.strip()[:80]!r}"))

    for line_no, row in enumerate_jsonl(path, on_error=bad_row):
        if not (
            isinstance(row, dict)
            and isinstance(row.get("image"), str)
            and isinstance(row.get("caption"), str)
        ):
            bad_row(line_no, json.dumps(row, ensure_ascii=False))
            continue
        image, caption = row["image"], row["caption"]
        if image in captions:
            same = "same caption" if captions[image] == caption else f"differs: {caption[:40]!r}"
            problems.append(
                Problem(
                    "duplicate_caption",
                    image,
                    method,
                    f"{path}:{line_no} repeats the row of line {seen_rows[image]} ({same})",
                )
            )
            continue
        captions[image], seen_rows[image] = caption, line_no
        if not caption.strip():
            problems.append(Problem("empty_caption", image, method, f"{path}:{line_no}"))
    return captions, problems


def _match_image_keys(
    captions: Mapping[str, str], ids: Sequence[str], method: str
) -> tuple[dict[str, str], list[Problem]]:
    """Re-key captions by image id. A caption key matches an id when it equals it, or when the id is
    a trailing run of its path components (``/data/heldout/a.png`` → ``a.png``), so a captioner that
    wrote absolute paths still lines up with a folder's relative ids. Unmatched rows are reported."""
    by_parts = {PurePath(i).parts: i for i in ids}
    id_set = set(ids)
    matched: dict[str, str] = {}
    problems: list[Problem] = []
    for key, caption in captions.items():
        image_id = key if key in id_set else _match_path_suffix(PurePath(key).parts, by_parts)
        if image_id is None:
            problems.append(Problem("unknown_image", key, method, "not in the image list"))
        elif image_id in matched:
            problems.append(
                Problem("duplicate_caption", image_id, method, f"{key!r} names the same image again")
            )
        else:
            matched[image_id] = caption
    return matched, problems


def _match_path_suffix(parts: tuple[str, ...], by_parts: Mapping[tuple[str, ...], str]) -> str | None:
    for start in range(1, len(parts)):  # longest suffix first; the full key was tried already
        if parts[start:] in by_parts:
            return by_parts[parts[start:]]
    return None


# --- the experiment ----------------------------------------------------------------------------


class ImageTextEmbedder(Protocol):
    """What :func:`run_winrate` needs from a scorer (``seechat.data.scorer.ChineseClipScorer``)."""

    name: str

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...  # (N, D), L2-normalised

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor: ...  # (N, D), L2-normalised


def run_winrate(
    images: Sequence[str],
    image_loader: Callable[[str], Image.Image],
    caption_files: Mapping[str, str | Path],
    scorer: ImageTextEmbedder,
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    tie_tol: float = 0.0,
) -> WinRateResult:
    """Score every method's caption of every listed image, compute win rates, write the report.

    ``images`` are image ids (duplicates are reported and scored once), ``image_loader(id)`` returns
    a PIL image or raises, ``caption_files`` maps method name -> captions JSONL. ``batch_size`` is
    the number of images decoded at once. Report files go to ``out_dir`` (see ``result.files``).
    """
    if not caption_files:
        raise ValueError("run_winrate needs at least one captions file")
    methods = list(caption_files)
    ids, problems = _dedupe_ids(images)
    captions: dict[str, dict[str, str]] = {}
    for method, path in caption_files.items():
        rows, row_problems = load_captions(path, method)
        captions[method], match_problems = _match_image_keys(rows, ids, method)
        problems += row_problems + match_problems
        problems += [Problem("missing_caption", i, method) for i in ids if i not in captions[method]]
    log.info("win rate: %d images, %d methods; embedding images", len(ids), len(methods))
    readable, image_embeds, load_problems = _embed_images(ids, image_loader, scorer, batch_size)
    problems += load_problems
    scores = _score_table(ids, readable, image_embeds, captions, methods, scorer)
    result = compute_winrate(
        scores, methods, ids, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence, tie_tol=tie_tol
    )
    unreadable = {p.image for p in load_problems}
    status = [
        "unreadable_image" if i in unreadable else s for i, s in zip(ids, result.image_status, strict=True)
    ]
    problems += [Problem("no_scores", i) for i, s in zip(ids, status, strict=True) if s == "no_scores"]
    result = replace(result, image_status=status, scorer=scorer.name, problems=problems)
    return replace(result, files=write_report(result, Path(out_dir)))


def _dedupe_ids(images: Sequence[str]) -> tuple[list[str], list[Problem]]:
    ids = list(dict.fromkeys(images))
    counts: dict[str, int] = {}
    for image_id in images:
        counts[image_id] = counts.get(image_id, 0) + 1
    problems = [Problem("duplicate_image", i, "", f"listed {c} times") for i, c in counts.items() if c > 1]
    return ids, problems


def _embed_images(
    ids: Sequence[str], image_loader: Callable[[str], Image.Image], scorer: ImageTextEmbedder, batch_size: int
) -> tuple[np.ndarray, torch.Tensor | None, list[Problem]]:
    """Load and embed images batch by batch. Returns the readable rows' indices (R,), their
    embeddings (R, D) (None when R = 0) and one problem per unreadable image."""
    rows: list[int] = []
    chunks: list[torch.Tensor] = []
    problems: list[Problem] = []
    for start in range(0, len(ids), batch_size):
        batch_rows, batch_images = [], []
        for row in range(start, min(start + batch_size, len(ids))):
            try:
                batch_images.append(image_loader(ids[row]))
            except Exception as err:  # any decode failure of one image is reported, not fatal to the run
                problems.append(Problem("unreadable_image", ids[row], "", f"{type(err).__name__}: {err}"))
                continue
            batch_rows.append(row)
        if batch_images:
            chunks.append(scorer.embed_images(batch_images))
            rows += batch_rows
    return np.array(rows, dtype=np.int64), (torch.cat(chunks) if chunks else None), problems


def _score_table(
    ids: Sequence[str],
    readable: np.ndarray,
    image_embeds: torch.Tensor | None,
    captions: Mapping[str, Mapping[str, str]],
    methods: Sequence[str],
    scorer: ImageTextEmbedder,
) -> np.ndarray:
    """(I, M) cosine table; NaN where the image is unreadable or the method has no caption."""
    scores = np.full((len(ids), len(methods)), np.nan)
    if image_embeds is None:
        return scores
    readable_ids = [ids[row] for row in readable]  # image_embeds[k] belongs to readable_ids[k]
    # Embed each distinct caption once: identical captions get identical scores and tie exactly.
    texts = sorted({captions[m][i] for m in methods for i in readable_ids if i in captions[m]})
    if not texts:
        return scores
    text_index = {t: k for k, t in enumerate(texts)}
    text_embeds = scorer.embed_texts(texts)  # (T, D)
    for j, method in enumerate(methods):
        have = [k for k, i in enumerate(readable_ids) if i in captions[method]]
        if not have:
            continue
        text_k = [text_index[captions[method][readable_ids[k]]] for k in have]
        cos = (image_embeds[have] * text_embeds[text_k]).sum(dim=-1)  # (P,)
        scores[readable[have], j] = cos.double().numpy()
    return scores
