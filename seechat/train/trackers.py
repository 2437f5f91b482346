"""Experiment trackers for `train.report_to`: accelerate's TensorBoard and Weights & Biases trackers.

The loop always writes `train/metrics.jsonl` and `train/loss.png`; `report_to` adds trackers that
receive the same rows (as `train/<name>`), the held-out evaluation (`eval/<name>`), and the run's
resolved config as hyperparameters (dotted keys, as in `key=value` overrides). Only rank 0 starts a
tracker, so only rank 0 writes.

A resumed run continues the same curves:
    tensorboard  events go to `<output_dir>/train/tensorboard/`. Resuming cuts the event files
                 back to the resume step, as it cuts metrics.jsonl: what the interrupted run logged
                 after its last resume point is logged again, once, by the resumed run. (The files
                 themselves are cut, not just hidden with `purge_step`, so every reader agrees.)
    wandb        the run id is kept in `train/trackers.json`; a resumed run reopens that run
                 (`resume="allow"`), and W&B ignores the re-logged steps it already has (their loss
                 is bit-identical: resume is exact). Files go to `<output_dir>/train/wandb/`; the
                 project is $WANDB_PROJECT or "seechat", the run name the output folder's name.
                 `WANDB_MODE=offline` keeps everything local.

Each tracker's package is an optional extra (`pip install 'seechat[tensorboard]'` / `[wandb]`);
asking for one that is not installed is an error before any model is built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker

STATE_FILE = "trackers.json"  # in train/: what a resumed run needs to reopen its trackers


class TrackerNotInstalledError(ImportError):
    """`train.report_to` names a tracker whose package is not installed; the message names the extra."""


@dataclass(frozen=True)
class TrackerSpec:
    modules: tuple[str, ...]  # any one of these makes the tracker usable
    extra: str  # the seechat extra that installs it
    build: Callable[[Path, str, int | None, dict], GeneralTracker]  # (run_dir, run name, resume step, state)


def _tensorboard(run_dir: Path, name: str, resume_step: int | None, state: dict) -> GeneralTracker:
    return TensorBoardTracker("tensorboard", run_dir)


def _wandb(run_dir: Path, name: str, resume_step: int | None, state: dict) -> GeneralTracker:
    run_id = state.get("wandb_run_id") or secrets.token_hex(4)
    return WandBTracker(
        os.environ.get("WANDB_PROJECT") or "seechat", name=name, id=run_id, resume="allow", dir=str(run_dir)
    )


TRACKERS: dict[str, TrackerSpec] = {
    # accelerate writes through torch.utils.tensorboard; resuming reads and cuts with tensorboard's own code
    "tensorboard": TrackerSpec(("tensorboard",), "tensorboard", _tensorboard),
    "wandb": TrackerSpec(("wandb",), "wandb", _wandb),
}


def check_installed(names: Sequence[str]) -> None:
    for name in names:
        spec = TRACKERS[name]
        if not any(importlib.util.find_spec(m) for m in spec.modules):
            raise TrackerNotInstalledError(
                f"train.report_to asks for {name!r}, but {' or '.join(spec.modules)} is not installed: "
                f"pip install 'seechat[{spec.extra}]' (or drop {name} from train.report_to)"
            )


def flat_config(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys with scalar values (lists as JSON text): what
    TensorBoard's hparams accept, and the same keys as the `key=value` overrides."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        elif isinstance(v, list | tuple):
            out[key] = json.dumps(v, ensure_ascii=False)
        else:
            out[key] = v
    return out


def build_trackers(
    names: Sequence[str], run_dir: Path, run_name: str, resume_step: int | None
) -> list[GeneralTracker]:
    """accelerate tracker objects for `names` (nothing is started or written yet), for
    `Accelerator(log_with=...)`. `resume_step` is the step a resumed run continues from (None: fresh)."""
    check_installed(names)
    state = _read_state(run_dir) if resume_step is not None else {}
    return [TRACKERS[n].build(run_dir, run_name, resume_step, state) for n in dict.fromkeys(names)]


def record_config(trackers: Sequence[GeneralTracker], run_dir: Path, config: dict, resumed: bool) -> None:
    """After `Accelerator.init_trackers` started them, on rank 0 (the caller checks): the resolved
    config as hyperparameters, and what a resumed run needs to reopen the trackers. A resumed run
    does not write TensorBoard hyperparameters again: each write is a run of its own there."""
    state = _read_state(run_dir) if resumed else {}
    hparams = flat_config(config)
    for t in trackers:
        if isinstance(t, WandBTracker):
            state["wandb_run_id"] = t.init_kwargs["id"]
        if not (resumed and isinstance(t, TensorBoardTracker) and _has_hparams(Path(t.logging_dir))):
            t.store_init_configuration(hparams)
    if trackers:
        (run_dir / STATE_FILE).write_text(json.dumps(state, indent=1))


def reset_tracker_files(run_dir: Path) -> None:
    """A run that starts over drops the TensorBoard curves and tracker state of the run it replaces,
    as it empties metrics.jsonl (W&B runs are kept: a new run gets a new id)."""
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    (run_dir / STATE_FILE).unlink(missing_ok=True)


def truncate_tracker_files(run_dir: Path, step: int) -> None:
    """Cut the TensorBoard event files of `run_dir` back to `step` (a resume point): events of later
    steps are dropped, a record torn by a kill included. Rank 0, before the trackers start."""
    tb = run_dir / "tensorboard"
    if not tb.is_dir() or importlib.util.find_spec("tensorboard") is None:
        return
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(tb.glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [r for r in records if Event.FromString(r).step <= step]
        if len(kept) == len(records) and path.stat().st_size == sum(len(r) + 16 for r in records):
            continue  # nothing after the resume point, nothing torn
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for r in kept:
                writer.write(r)
        os.replace(tmp, path)


def finish_trackers(trackers: Sequence[GeneralTracker]) -> None:
    """Close every tracker (flush files, end the W&B run). Not `Accelerator.end_training`, which
    would also destroy the process group under the caller's feet."""
    for t in trackers:
        t.finish()


def _has_hparams(logging_dir: Path) -> bool:
    return any(logging_dir.glob("*/hparams.yml"))


def _read_state(run_dir: Path) -> dict:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
