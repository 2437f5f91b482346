"""Stream image–text pairs from webdataset tar shards for stage-1 training, with exact resume.

:class:`PairShardDataset` is a ``torch.utils.data.IterableDataset`` that reads shards in the
img2dataset layout (``KEY.jpg`` or another of ``IMAGE_EXTENSIONS`` + ``KEY.txt`` + ``KEY.json``) one
member at a time through :mod:`seechat.data.shards` — the data set is never held in memory — and
yields ``{"key", "image" (PIL RGB, opened by :func:`seechat.data.images.load_image`), "text", "meta"}``.

Per epoch, for every consumer ("slot" = distributed rank × DataLoader worker):

1. the shard list is shuffled with ``Random((seed, epoch))`` — identical on every rank;
2. shards are split across ranks, then across the rank's workers (``shards[i::n]``); where there
   are fewer shards than consumers the split falls back to samples (``sample_index % n``), so every
   sample still goes to exactly one consumer;
3. samples pass a cheap structural check (members present, JSON parses, image header parses,
   JPEG not truncated); failures are skipped, counted and their keys remembered. A sample whose
   members together exceed ``max_sample_bytes`` (default 64 MiB) is skipped the same way without
   its data being read into memory: a shard cannot run a loader out of memory (a gzip bomb: a
   small ``.tar.gz`` whose member inflates to gigabytes);
4. a shuffle buffer of still-encoded samples, seeded by (seed, epoch, rank, worker), reorders them;
5. images are decoded to RGB (a decode failure is skipped and counted too).

Exact resume: the trainer calls :meth:`PairShardDataset.set_resume` with the number of global
batches it consumed. With automatic batching torch's DataLoader takes batch ``j`` from the workers
in round-robin order, skipping workers that ran dry (:func:`resume_schedule` replays that), so each
worker knows how many of the first ``batches_consumed`` batches were its own and drops
``that × batch_size`` samples after step 4 *without decoding them*. A fresh DataLoader starts its
cycle at worker 0, so the resumed run also rotates the worker streams (loader worker ``i`` continues
stream ``(i + next) % n``) to keep the original interleaving. With several workers each one counts
every worker's samples from the tar headers (no data read) to know where a worker ran dry.
Steps 1–4 are deterministic, so the resumed stream equals the uninterrupted one, with two residues
of bad *content* behind intact members: an image whose header and end marker pass but whose body
fails to decode is dropped in step 5, after the fast-forward counted it, so a resume past it is one
sample off in that worker's stream; and a bad sample in *another* worker's stream is invisible to
the header count, which matters only for a resume in the epoch's tail after a worker ran dry.

What this module is not: a downloader (local paths only), an image preprocessor (pass ``transform``
or use the collator), or a map-style dataset (there is no ``len``; use the shards' stats files).
Call ``set_epoch``/``set_resume`` before creating the DataLoader iterator and do not use
``persistent_workers=True`` with them (workers keep the dataset copy they were started with).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from seechat.data.images import IMAGE_EXTENSIONS, ImageError, load_image, probe_image
from seechat.data.jsonl import append_jsonl, iter_jsonl
from seechat.data.shards import (
    DEFAULT_MAX_SAMPLE_BYTES,
    UnreadMember,
    expand_shards,
    iter_tar_member_names,
    iter_tar_samples,
)

logger = logging.getLogger(__name__)

IMAGE_EXTS = tuple(e.removeprefix(".") for e in IMAGE_EXTENSIONS)  # shard member extensions
MAX_REMEMBERED_KEYS = 1000

Sample = dict[str, Any]


# -- epoch plan: which shards / samples a consumer reads ---------------------------------------------


@dataclass(frozen=True)
class SlotPlan:
    """What one (rank, worker) consumer reads: these shards, keeping ``index % modulus == remainder``."""

    shards: tuple[str, ...]
    modulus: int = 1
    remainder: int = 0


def _split(plan: SlotPlan, part: int, parts: int) -> SlotPlan:
    """Give ``part`` of ``parts`` consumers its share: by shard if enough shards, else by sample."""
    if parts == 1:
        return plan
    if plan.modulus == 1 and len(plan.shards) >= parts:
        return SlotPlan(plan.shards[part::parts])
    # index % (m * parts) == r + m * part  <=>  index % m == r and (index // m) % parts == part
    return SlotPlan(plan.shards, plan.modulus * parts, plan.remainder + plan.modulus * part)


def plan_slot(
    shards: Sequence[str],
    *,
    seed: int,
    epoch: int,
    shuffle_shards: bool,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> SlotPlan:
    """The deterministic per-epoch assignment of shards/samples to one consumer."""
    order = list(shards)
    if shuffle_shards:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    by_rank = _split(SlotPlan(tuple(order)), rank, world_size)
    return _split(by_rank, worker, num_workers)


def _raw_samples(
    plan: SlotPlan, max_sample_bytes: int
) -> Iterator[tuple[str, str, dict[str, bytes | UnreadMember]]]:
    """(shard, key, members) for the samples this plan keeps, in stream order."""
    index = 0
    for shard in plan.shards:
        for key, members in iter_tar_samples(shard, max_sample_bytes):
            if index % plan.modulus == plan.remainder:
                yield shard, key, members
            index += 1


# -- validation, shuffling, decoding -----------------------------------------------------------------


@dataclass(frozen=True)
class CheckedPair:
    """An image–text pair that passed the cheap structural checks (`check_sample`), its image still
    encoded bytes; decoding comes later, after the shuffle buffer. (Not `seechat.data.processor.Encoded`,
    which is a tokenised training sample.)"""

    key: str
    image_bytes: bytes
    text: str
    meta: dict[str, Any]


class CorruptSample(ValueError):
    """Raised internally for a sample that must be skipped; the message is the reason."""


def image_ext(members: dict[str, bytes]) -> str:
    """The extension of a sample's image member (the first of IMAGE_EXTS present)."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext
    raise CorruptSample("missing image member")


def _check_image_header(data: bytes, ext: str) -> None:
    try:  # the header only, with the accepted formats: what decode_rgb would refuse is refused here
        image_format = probe_image(data, max_pixels=None).format
    except ImageError as e:
        raise CorruptSample(f"bad image ({type(e).__name__})") from e
    if not _has_end_marker(data, image_format):
        raise CorruptSample(f"truncated {image_format} (no end marker)")


def _has_end_marker(data: bytes, image_format: str | None) -> bool:
    """Cheap truncation check — truncation is the common web corruption and needs no decode.

    JPEG: an EOI marker (FFD9) in the last 4 KiB; it cannot occur inside entropy-coded data, and
    the window tolerates the trailers some cameras append. PNG: the IEND chunk. WebP: the RIFF size.
    """
    if image_format == "JPEG":
        return data.find(b"\xff\xd9", max(0, len(data) - 4096)) >= 0
    if image_format == "PNG":
        return data.find(b"IEND", max(0, len(data) - 64)) >= 0
    if image_format == "WEBP":
        return len(data) >= 8 + int.from_bytes(data[4:8], "little")
    return True


def _parse_meta(members: dict[str, bytes], required: bool) -> dict[str, Any]:
    if "json" not in members:
        if required:
            raise CorruptSample("missing json member")
        return {}
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptSample(f"bad json ({type(e).__name__})") from e
    if not isinstance(meta, dict):
        raise CorruptSample("json member is not an object")
    return meta


def _text(members: dict[str, bytes], meta: dict[str, Any], text_field: str) -> str:
    if text_field == "txt":
        if "txt" not in members:
            raise CorruptSample("missing txt member")
        try:
            return members["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorruptSample("txt member is not UTF-8") from e
    name = text_field.removeprefix("json:")
    value = meta.get(name)
    if not isinstance(value, str):
        raise CorruptSample(f"json field {name!r} missing or not a string")
    return value


def check_sample(key: str, members: dict[str, bytes | UnreadMember], text_field: str) -> CheckedPair:
    """The cheap, deterministic validity check (no pixel decoding). Raises :class:`CorruptSample`."""
    for name, member in members.items():
        if isinstance(member, UnreadMember):
            raise CorruptSample(
                f"sample too large ({key}.{name} takes its members to {member.sample_size:,} bytes, "
                f"more than the limit of {member.limit:,}: data.max_sample_mb in training, "
                "--max-sample-size in `seechat data filter`)"
            )
    ext = image_ext(members)
    meta = _parse_meta(members, required=text_field != "txt")
    text = _text(members, meta, text_field)
    _check_image_header(members[ext], ext)
    return CheckedPair(key, members[ext], text, meta)


def _structurally_complete(exts: set[str], size: int, text_field: str, max_sample_bytes: int) -> bool:
    """Header-only twin of :func:`check_sample` used to count samples without reading data."""
    has_image = any(e in exts for e in IMAGE_EXTS)
    has_text = "txt" in exts if text_field == "txt" else "json" in exts
    return has_image and has_text and size <= max_sample_bytes


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle: fill ``size`` items, then emit a random one per new item."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def decode_rgb(data: bytes) -> Image.Image:
    """The sample's image the way every part of seechat opens one (`seechat.data.images.load_image`:
    accepted formats, first frame, EXIF orientation, transparency on white, RGB); Pillow's own
    decompression-bomb limit, since the shard's size limit already bounds the bytes."""
    return load_image(data, max_pixels=None)


# -- resume arithmetic --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumeSchedule:
    """Where each worker stands after ``batches_consumed`` global batches.

    ``consumed[v]``: batches worker ``v`` had delivered. ``first_worker``: the worker whose batch
    comes next; a fresh DataLoader starts its cycle at worker 0, so the resumed run gives loader
    worker ``i`` the stream of worker ``(i + first_worker) % n`` to continue the original cycle.
    """

    consumed: tuple[int, ...]
    first_worker: int


def resume_schedule(batches_per_worker: Sequence[float], batches_consumed: int) -> ResumeSchedule:
    """Replay torch's DataLoader batch order up to ``batches_consumed``.

    With automatic batching the DataLoader takes batches round-robin (worker 0, 1, …, n-1, 0, …)
    and drops a worker from the cycle once it is exhausted; worker ``v`` yields
    ``batches_per_worker[v]`` batches (``math.inf`` when unknown). Round ``r`` holds the ``r``-th
    batch of every worker with more than ``r`` batches, so the global order is by (round, worker).
    """
    n = len(batches_per_worker)

    def before_round(r: int) -> float:  # global batches emitted before round r starts
        return sum(min(b, r) for b in batches_per_worker)

    lo, hi = 0, batches_consumed  # the round R in which global batch number `batches_consumed` falls
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if before_round(mid) <= batches_consumed:
            lo = mid
        else:
            hi = mid - 1
    remaining = int(batches_consumed - before_round(lo))
    active = [v for v in range(n) if batches_per_worker[v] > lo]
    consumed = tuple(int(min(b, lo)) + (v in active[:remaining]) for v, b in enumerate(batches_per_worker))
    upcoming = active[remaining:]
    return ResumeSchedule(consumed, upcoming[0] if upcoming else 0)


# -- skip bookkeeping ---------------------------------------------------------------------------------


@dataclass
class SkipReport:
    """Corrupt samples seen: total, by reason, and the first ``MAX_REMEMBERED_KEYS`` keys."""

    count: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    keys: list[str] = field(default_factory=list)

    def add(self, key: str, reason: str) -> None:
        self.count += 1
        self.by_reason[reason.split(" (")[0]] += 1
        if len(self.keys) < MAX_REMEMBERED_KEYS:
            self.keys.append(key)

    def summary(self) -> str:
        if not self.count:
            return "no corrupt samples"
        reasons = ", ".join(f"{r}: {c}" for r, c in self.by_reason.most_common())
        more = f" (+{self.count - len(self.keys)} more)" if self.count > len(self.keys) else ""
        return f"skipped {self.count} corrupt samples ({reasons}); keys: {', '.join(self.keys)}{more}"


def log_skip(path: Path, key: str, reason: str, source: str) -> None:
    """Append one skipped sample to a skip log (JSONL: key, reason, shard or file). Each process
    writes its own file; the trainer counts every file of its skip folder into its summary."""
    append_jsonl(path, [{"key": key, "reason": reason, "shard": source}])


@dataclass(frozen=True)
class ResumeState:
    epoch: int
    batches_consumed: int
    batch_size: int
    drop_last: bool = False


# -- the dataset ---------------------------------------------------------------------------------------


class PairShardDataset(IterableDataset):
    """Iterate image–text pairs from tar shards; see the module docstring for the guarantees.

    Args:
        shards: a path, glob or brace pattern, or a list of them.
        text_field: ``"txt"`` (the ``.txt`` member) or ``"json:<field>"`` (a field of the ``.json``).
        shuffle_buffer: samples held (still encoded) for shuffling; ``0``/``1`` keeps stream order.
        seed: base seed of shard order and shuffle buffer.
        shuffle_shards: shuffle the shard list every epoch.
        rank, world_size: this process's share; default from ``torch.distributed`` when
            initialised, else 0 / 1.
        transform: applied to each yielded dict inside the worker (e.g. image preprocessing).
        skip_log_dir: if set, every worker appends the keys it skips to a JSONL file there, so
            :attr:`skipped` can report corrupt samples seen in DataLoader worker processes too.
        max_sample_bytes: a sample whose tar members together are larger is skipped (counted as
            corrupt) without its data being read.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        text_field: str = "txt",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        shuffle_shards: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        transform: Callable[[Sample], Any] | None = None,
        skip_log_dir: str | os.PathLike[str] | None = None,
        max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES,
    ) -> None:
        super().__init__()
        if text_field != "txt" and not text_field.startswith("json:"):
            raise ValueError(f"text_field must be 'txt' or 'json:<field>', got {text_field!r}")
        if max_sample_bytes < 1:
            raise ValueError(f"max_sample_bytes must be positive, got {max_sample_bytes}")
        self.shards = expand_shards(shards)
        self.text_field = text_field
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.rank, self.world_size = _distributed_position(rank, world_size)
        self.transform = transform
        self.skip_log_dir = Path(skip_log_dir) if skip_log_dir is not None else None
        self.max_sample_bytes = max_sample_bytes
        self.epoch = 0
        self._resume: ResumeState | None = None
        self._skipped = SkipReport()

    # -- epoch / resume control -----------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order and shuffle are used; clears a resume for another epoch."""
        self.epoch = epoch
        if self._resume is not None and self._resume.epoch != epoch:
            self._resume = None

    def set_resume(
        self, epoch: int, batches_consumed: int, batch_size: int, *, drop_last: bool = False
    ) -> None:
        """Continue ``epoch`` after the first ``batches_consumed`` global batches of ``batch_size``.

        Must match the DataLoader's ``batch_size``/``drop_last`` (and its ``num_workers`` must be
        the same as in the interrupted run).
        """
        if batches_consumed < 0 or batch_size < 1:
            raise ValueError("batches_consumed must be >= 0 and batch_size >= 1")
        self.epoch = epoch
        self._resume = ResumeState(epoch, batches_consumed, batch_size, drop_last)

    def state_dict(self, batches_consumed: int, batch_size: int) -> dict[str, int]:
        """What a checkpoint must store to resume this stream exactly."""
        return {"epoch": self.epoch, "batches_consumed": batches_consumed, "batch_size": batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_resume(int(state["epoch"]), int(state["batches_consumed"]), int(state["batch_size"]))

    # -- iteration ---------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker, to_skip = self._resume_position(loader_worker, num_workers)
        plan = self._plan(worker, num_workers)
        rng = random.Random(f"buffer/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        stream = shuffle_buffer(self._checked(plan, worker), self.shuffle_buffer, rng)
        for index, encoded in enumerate(stream):
            if index < to_skip:
                continue  # fast-forward: never decoded
            sample = self._decode(encoded, worker)
            if sample is not None:
                yield self.transform(sample) if self.transform is not None else sample
        if self._skipped.count:
            logger.warning(
                "rank %d worker %d epoch %d: %s", self.rank, worker, self.epoch, self._skipped.summary()
            )

    @property
    def skipped(self) -> SkipReport:
        """Corrupt samples seen by this process, plus those logged by workers in ``skip_log_dir``."""
        if self.skip_log_dir is None or not self.skip_log_dir.is_dir():
            return self._skipped
        report = SkipReport()
        for path in sorted(self.skip_log_dir.glob("skipped-*.jsonl")):
            for entry in iter_jsonl(path):
                report.add(entry["key"], entry["reason"])
        return report

    # -- internals ----------------------------------------------------------------------------------------

    def _plan(self, worker: int, num_workers: int) -> SlotPlan:
        return plan_slot(
            self.shards,
            seed=self.seed,
            epoch=self.epoch,
            shuffle_shards=self.shuffle_shards,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
        )

    def _checked(self, plan: SlotPlan, worker: int) -> Iterator[CheckedPair]:
        for shard, key, members in _raw_samples(plan, self.max_sample_bytes):
            try:
                yield check_sample(key, members, self.text_field)
            except CorruptSample as e:
                self._record_skip(key, str(e), shard, worker)

    def _decode(self, encoded: CheckedPair, worker: int) -> Sample | None:
        try:
            image = decode_rgb(encoded.image_bytes)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            self._record_skip(encoded.key, f"image decode failed ({type(e).__name__})", "", worker)
            return None
        return {"key": encoded.key, "image": image, "text": encoded.text, "meta": encoded.meta}

    def _record_skip(self, key: str, reason: str, shard: str, worker: int) -> None:
        logger.warning("skipping corrupt sample %r in %s: %s", key, shard or "<decode>", reason)
        self._skipped.add(key, reason)
        if self.skip_log_dir is not None:
            log_skip(
                self.skip_log_dir / f"skipped-r{self.rank}-w{worker}-e{self.epoch}.jsonl", key, reason, shard
            )

    def _resume_position(self, loader_worker: int, num_workers: int) -> tuple[int, int]:
        """(the worker stream this loader worker continues, samples of it to fast-forward)."""
        resume = self._resume
        if resume is None or resume.epoch != self.epoch or resume.batches_consumed == 0:
            return loader_worker, 0
        if num_workers == 1:
            return 0, resume.batches_consumed * resume.batch_size
        batches = [self._count_batches(v, num_workers, resume) for v in range(num_workers)]
        schedule = resume_schedule(batches, resume.batches_consumed)
        worker = (loader_worker + schedule.first_worker) % num_workers
        return worker, schedule.consumed[worker] * resume.batch_size

    def _count_batches(self, worker: int, num_workers: int, resume: ResumeState) -> int:
        """Batches worker ``worker`` yields this epoch, from tar headers only (no data read)."""
        plan = self._plan(worker, num_workers)
        index = samples = 0
        for shard in plan.shards:
            for _, exts, size in iter_tar_member_names(shard):
                complete = _structurally_complete(exts, size, self.text_field, self.max_sample_bytes)
                if index % plan.modulus == plan.remainder and complete:
                    samples += 1
                index += 1
        rounding = math.floor if resume.drop_last else math.ceil
        return int(rounding(samples / resume.batch_size))


def _distributed_position(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank is not None or world_size is not None:
        raise ValueError("pass both rank and world_size, or neither")
    return 0, 1
