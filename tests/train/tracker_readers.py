"""Read tracker output back with the trackers' own code: TensorBoard's event readers, W&B's records."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: {tag: [(step, value), ...]} through its EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_raw_steps(log_dir: Path, tag: str) -> Counter:
    """How often each step of `tag` is on disk, over every event file, read record by record
    (no reader-side purging of orphaned steps)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps: Counter = Counter()
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps.update(event.step for v in event.summary.value if v.tag == tag)
    return steps


def tensorboard_hparams(log_dir: Path) -> dict:
    """The hyperparameters of the run's hparams plugin summary (written by accelerate)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    runs = [d for d in Path(log_dir).iterdir() if d.is_dir() and any(d.glob("events.out.tfevents.*"))]
    assert len(runs) == 1, runs
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def wandb_records(path: Path):
    """The records of a `.wandb` run file (W&B's LevelDB-style log of `Record` protos)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""  # 7-byte file header; then 32 KiB blocks of (crc, length, type) records
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE.../LAST
            yield pb.Record.FromString(pending)
            pending = b""


def wandb_history(path: Path) -> dict[int, dict]:
    """{step: {key: value}} of a `.wandb` run file."""
    rows = {}
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            rows[r.history.step.num] = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
            }
    return rows


def wandb_config(path: Path) -> dict:
    out = {}
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "config":
            out.update({i.key: json.loads(i.value_json) for i in r.config.update})
    return out
