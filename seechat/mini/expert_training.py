"""Plumbing shared by the mini-expert recipes (`seechat.mini.clip_expert`, `seechat.mini.lm_expert`).

A recipe run: skip when `done.json` already records the same recipe and world, otherwise build the
output in a temp dir and rename it into place; one AdamW + warmup/cosine loop with a tqdm bar,
`metrics.jsonl` and a loss-curve PNG; readers for the mini world's files. Nothing model-specific.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from seechat.atomic import atomic_directory
from seechat.data.images import load_image
from seechat.data.jsonl import dumps_line, read_jsonl
from seechat.data.shards import iter_tar_samples
from seechat.mini.fresh import text_fingerprint
from seechat.train.plots import plot_loss_curve
from seechat.train.schedule import warmup_cosine

PathLike = str | os.PathLike[str]
DONE = "done.json"


class Recipe(Protocol):
    """What the shared loop reads from a recipe dataclass."""

    steps: int
    lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float
    log_every: int


# --------------------------------------------------------------------------- running a recipe


@contextlib.contextmanager
def torch_threads(n: int | None = None) -> Iterator[None]:
    """Run with `n` intra-op threads (default: every core, at most 8 — these matmuls are small)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or min(8, os.cpu_count() or 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def done_marker(recipe: Any) -> dict[str, Any]:
    """What `done.json` must hold for a finished output to be reused: the recipe and the fingerprint
    of the world's generators that made its training data (in JSON form, tuples as lists, so that it
    compares equal to what was written)."""
    marker = {"recipe": asdict(recipe), "world_fingerprint": text_fingerprint()}
    return json.loads(json.dumps(marker))


def is_done(out: Path, marker: dict[str, Any]) -> bool:
    try:
        done = json.loads((out / DONE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return {k: done.get(k) for k in marker} == marker


def run_atomic(
    out: Path, marker: dict[str, Any], force: bool, write: Callable[[Path], dict[str, Any]]
) -> Path:
    """Unless `out` is already done: `write(tmp) -> stats`, add `done.json`, rename tmp to `out`."""
    if not force and is_done(out, marker):
        return out
    with atomic_directory(out) as tmp:
        stats = write(tmp)
        (tmp / DONE).write_text(
            json.dumps({**marker, **stats}, ensure_ascii=False, indent=1), encoding="utf-8"
        )
    return out


def train_loop(
    name: str,
    out: Path,
    params: list[torch.nn.Parameter],
    recipe: Recipe,
    loss_at: Callable[[int], torch.Tensor],
    after_step: Callable[[], None] = lambda: None,
    log_extra: Callable[[int], dict[str, Any]] = lambda step: {},
) -> dict[str, Any]:
    """AdamW (no decay on vectors) + warmup/cosine for `recipe.steps`; `loss_at(step)` builds the
    step's batch and returns its loss. Writes `metrics.jsonl` and `loss.png` into `out`; each logged
    row also holds `log_extra(step)` (e.g. a held-out score along the way)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms, biases, temperature
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, recipe.warmup_steps, recipe.steps, recipe.min_lr_ratio)
    )
    losses: list[float] = []
    start = time.perf_counter()
    with (
        open(out / "metrics.jsonl", "w", encoding="utf-8") as log,
        tqdm(range(recipe.steps), desc=name, unit="step", dynamic_ncols=True) as bar,
    ):
        for step in bar:
            loss = loss_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step()
            sched.step()
            after_step()
            losses.append(loss.item())
            if step % recipe.log_every == 0 or step == recipe.steps - 1:
                row = {
                    "step": step,
                    "loss": losses[-1],
                    "lr": sched.get_last_lr()[0],
                    "elapsed_s": round(time.perf_counter() - start, 2),
                    **log_extra(step),
                }
                log.write(dumps_line(row))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    plot_loss_curve(out / "metrics.jsonl", out / "loss.png", name)
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "train_seconds": round(time.perf_counter() - start, 1),
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
    }


# --------------------------------------------------------------------------- world files


def pair_meta(world: Path, split: str) -> dict[str, dict[str, Any]]:
    """key -> `KEY.json` metadata of the split's pair shards (caption, detailed, scene …)."""
    metas: dict[str, dict[str, Any]] = {}
    for shard in sorted(glob.glob(str(world / "pairs" / split / "*.tar"))):
        for _, members in iter_tar_samples(shard):
            if isinstance(members.get("json"), bytes):
                meta = json.loads(members["json"])  # type: ignore[arg-type]
                metas[meta["key"]] = meta
    return metas


def _strings(obj: Any) -> Iterator[str]:
    """Every string anywhere inside a JSON value."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def world_texts(world_root: PathLike) -> Iterator[str]:
    """All text the world holds: every JSONL file, and every pair's web text and metadata."""
    world = Path(world_root)
    for path in sorted(world.rglob("*.jsonl")):
        for row in read_jsonl(path):
            yield from _strings(row)
    for split in ("train", "val", "test"):
        for meta in pair_meta(world, split).values():
            yield from _strings({k: v for k, v in meta.items() if k != "scene"})


def load_pixels(world: Path, rel_paths: list[str]) -> torch.Tensor:
    """JPEGs (paths relative to the world root) -> uint8 (N, 3, H, W)."""
    arrays = [np.asarray(load_image(world / p)) for p in rel_paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
