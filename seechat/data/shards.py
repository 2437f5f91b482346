"""Webdataset tar shards in the img2dataset layout: the one place that reads and writes them.

Each sample ``KEY`` becomes three tar members, ``KEY.jpg`` (JPEG bytes), ``KEY.txt`` (the caption,
UTF-8) and ``KEY.json`` (metadata, always including ``key`` and ``caption``). Shards are named
``{prefix}00000.tar``, ``{prefix}00001.tar`` …; each is written to ``NAME.tmp`` and renamed into place
when complete, so a reader globbing ``*.tar`` never sees a half-written shard. On close the writer
leaves ``{prefix}NNNNN_stats.json`` next to every shard and a ``{prefix}stats.json`` summary
(samples, bytes, failures and which keys failed).

What this module is: shard iteration (:func:`expand_shards` for brace patterns and globs,
:func:`iter_tar_samples` streaming ``(key, {ext: bytes})`` groups with a per-sample size limit,
:func:`iter_tar_member_names` reading headers only; keys split as webdataset does), the writer
(:class:`ShardWriter`), image re-encoding (:func:`encode_image`), table readers for local TSV / CSV /
JSONL pair lists (:func:`read_pair_table`) and the conversion driver behind ``seechat data shards``
(:func:`write_pair_shards`). Every shard reader of the project — training (:mod:`seechat.data.pairs`),
the quality filter, image sources for captioning and win rate, the mini experts — iterates through
here; the ``webdataset`` package is not needed to read (the tests use it to check compatibility).
What it is not: a downloader — image URLs are refused (use img2dataset for that, it writes the same
layout) — and not the training-time dataset (sample checks, shuffling, resume), which is
:mod:`seechat.data.pairs`.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from braceexpand import braceexpand
from PIL import Image

from seechat.data.images import load_image
from seechat.data.jsonl import JsonlError, enumerate_jsonl

logger = logging.getLogger(__name__)

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads archives to whole records
MAX_LISTED_FAILURES = 1000  # cap on failed keys listed in the summary (per-shard stats list all)
_FIXED_MTIME = 0  # reproducible shards: identical input gives byte-identical tars
DEFAULT_MAX_SAMPLE_BYTES = 64 << 20  # one sample's members together; a web image is far smaller


# -- reading: shard lists and sample iteration ---------------------------------------------------------------


def expand_shards(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Expand brace patterns (``data/{00000..00099}.tar``) and globs (``data/*.tar``) into paths.

    Order: the order given, each glob sorted. A pattern that matches nothing is an error.
    """
    patterns = [shards] if isinstance(shards, str | os.PathLike) else list(shards)
    paths: list[str] = []
    for pattern in patterns:
        for expanded in braceexpand(str(pattern)):
            matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(f"no shard matches {expanded!r}")
            paths.extend(matches)
    return paths


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: key = path up to the first dot of the basename, ext = the rest."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (ext.lower() if dot else "")


@dataclass(frozen=True)
class UnreadMember:
    """Stands in :func:`iter_tar_samples`'s output for a member whose data was not read because
    its sample's members together exceed the size limit; :func:`check_sample` rejects the sample."""

    size: int  # bytes, from the tar header
    sample_size: int  # the sample's members together, up to and including this one
    limit: int


def iter_tar_samples(
    path: str, max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES
) -> Iterator[tuple[str, dict[str, bytes | UnreadMember]]]:
    """Stream (key, {ext: bytes}) groups of consecutive members sharing a key.

    A member that would take its sample past ``max_sample_bytes`` (by the sizes in the tar headers)
    is not read: it is skipped over in the stream (memory stays bounded, even for a gzip bomb) and
    stands as an :class:`UnreadMember`."""
    key, members, held = None, {}, 0
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_key(info.name)
                if k != key and key is not None:
                    yield key, members
                    members, held = {}, 0
                key = k
                held += info.size
                if held > max_sample_bytes:
                    members[ext] = UnreadMember(info.size, held, max_sample_bytes)
                else:
                    members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        logger.warning("shard %s is damaged after key %r (%s); reading stops there", path, key, e)
        return  # the group in flight may be incomplete: drop it
    if key is not None:
        yield key, members


def iter_tar_member_names(path: str) -> Iterator[tuple[str, set[str], int]]:
    """Like :func:`iter_tar_samples` but reads headers only (seeks over the data): (key, member
    extensions, the members' bytes together)."""
    key, exts, size = None, set(), 0
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_key(info.name)
                if k != key and key is not None:
                    yield key, exts, size
                    exts, size = set(), 0
                key = k
                exts.add(ext)
                size += info.size
    except (tarfile.TarError, OSError, EOFError):
        return
    if key is not None:
        yield key, exts, size


class ShardInputError(ValueError):
    """An input table row that cannot be converted (e.g. a URL instead of a local path)."""


@dataclass(frozen=True)
class PairRecord:
    """One image–text pair to be written.

    ``image`` is a local path, already-encoded image bytes or a PIL image; it is re-encoded to JPEG.
    ``key`` must not contain ``.`` or ``/`` (webdataset splits member names at the first dot).
    """

    key: str
    image: str | Path | bytes | Image.Image
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardStats:
    """What a writer produced: shard file names (relative to ``out_dir``), counts and failures."""

    out_dir: str
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    bytes: int = 0
    failures: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)  # [{"key", "reason"}], capped

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_shards": len(self.shards),
            "shards": self.shards,
            "samples": self.samples,
            "bytes": self.bytes,
            "failures": self.failures,
            "failed": self.failed,
            "failed_truncated": self.failures > len(self.failed),
        }


def _member_bytes(payload_size: int) -> int:
    """Bytes one tar member occupies: a header block plus the payload padded to whole blocks."""
    return TAR_BLOCK + -(-payload_size // TAR_BLOCK) * TAR_BLOCK


def _tar_file_bytes(members_bytes: int) -> int:
    """Final archive size: members + two zero end blocks, padded to a whole record."""
    raw = members_bytes + 2 * TAR_BLOCK
    return -(-raw // TAR_RECORD) * TAR_RECORD


def _check_key(key: str) -> None:
    if not key or "." in key or "/" in key or "\\" in key:
        raise ValueError(f"invalid sample key {key!r}: must be non-empty, without '.', '/' or '\\'")


class _OpenShard:
    """The shard being filled: its tar handle, running byte estimate and per-shard stats."""

    def __init__(self, final_path: Path) -> None:
        self.final_path = final_path
        self.tmp_path = final_path.with_name(final_path.name + ".tmp")
        self.tar = tarfile.open(self.tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self.members_bytes = 0
        self.samples = 0
        self.keys: set[str] = set()
        self.failed: list[dict[str, str]] = []
        self.start_time = time.time()

    def add_member(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mtime = _FIXED_MTIME
        info.mode = 0o444
        self.tar.addfile(info, io.BytesIO(payload))
        self.members_bytes += _member_bytes(len(payload))

    def finish(self) -> dict[str, Any]:
        """Close the tar, rename it into place, write its stats sidecar; return the stats."""
        self.tar.close()
        os.replace(self.tmp_path, self.final_path)
        end = time.time()
        stats = {
            "shard": self.final_path.name,
            "count": self.samples + len(self.failed),
            "successes": self.samples,
            "failures": len(self.failed),
            "failed": self.failed,
            "bytes": self.final_path.stat().st_size,
            "start_time": self.start_time,
            "end_time": end,
            "duration": end - self.start_time,
        }
        sidecar = self.final_path.with_name(self.final_path.name[: -len(".tar")] + "_stats.json")
        sidecar.write_text(json.dumps(stats, ensure_ascii=False, indent=1), encoding="utf-8")
        return stats


class ShardWriter:
    """Write samples into size-balanced tar shards; use as a context manager.

    A new shard starts when adding the next sample would exceed ``max_samples_per_shard`` samples
    or ``max_bytes_per_shard`` bytes (a single sample larger than the byte limit gets a shard of its
    own). Failures reported with :meth:`add_failure` are counted against the shard being written and
    listed in the stats files. Existing shards with the same ``prefix`` in ``out_dir`` are an error
    unless ``overwrite=True`` (then they are deleted first), so a glob never mixes two runs.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        max_samples_per_shard: int = 10_000,
        max_bytes_per_shard: int = 1 << 30,
        prefix: str = "",
        *,
        overwrite: bool = False,
    ) -> None:
        if max_samples_per_shard < 1 or max_bytes_per_shard < 1:
            raise ValueError("max_samples_per_shard and max_bytes_per_shard must be positive")
        self.out_dir = Path(out_dir)
        self.max_samples_per_shard = max_samples_per_shard
        self.max_bytes_per_shard = max_bytes_per_shard
        self.prefix = prefix
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._clear_previous(overwrite)
        self._shard: _OpenShard | None = None
        self._next_index = 0
        self._pending_failures: list[dict[str, str]] = []  # reported while no shard is open
        self.stats = ShardStats(out_dir=str(self.out_dir))
        self._closed = False

    # -- public API -------------------------------------------------------------------------------

    def write(self, key: str, image_bytes: bytes, text: str, meta: dict[str, Any]) -> None:
        """Append one sample (``key.jpg`` / ``key.txt`` / ``key.json``) to the current shard."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        _check_key(key)
        members = self._encode_members(key, image_bytes, text, meta)
        sample_bytes = sum(_member_bytes(len(payload)) for _, payload in members)
        shard = self._shard_for(sample_bytes)
        if key in shard.keys:
            raise ValueError(f"duplicate key {key!r} in shard {shard.final_path.name}")
        for name, payload in members:
            shard.add_member(name, payload)
        shard.keys.add(key)
        shard.samples += 1

    def add_failure(self, key: str, reason: str) -> None:
        """Record a sample that could not be written (e.g. an unreadable image); not fatal."""
        entry = {"key": key, "reason": reason}
        (self._shard.failed if self._shard is not None else self._pending_failures).append(entry)
        self.stats.failures += 1
        if len(self.stats.failed) < MAX_LISTED_FAILURES:
            self.stats.failed.append(entry)

    def close(self) -> ShardStats:
        """Finish the open shard and write ``{prefix}stats.json``; idempotent."""
        if self._closed:
            return self.stats
        self._finish_shard()
        self._closed = True
        summary = self.out_dir / f"{self.prefix}stats.json"
        summary.write_text(json.dumps(self.stats.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
        return self.stats

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # On error keep the completed shards but drop the partial one: it was never renamed.
        if self._shard is not None:
            self._shard.tar.close()
            self._shard.tmp_path.unlink(missing_ok=True)
            self._shard = None
        self._closed = True

    # -- internals --------------------------------------------------------------------------------

    def _clear_previous(self, overwrite: bool) -> None:
        old = sorted(self.out_dir.glob(f"{self.prefix}[0-9][0-9][0-9][0-9][0-9]*.tar"))
        if old and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already holds shards with prefix {self.prefix!r} ({old[0].name} …); "
                "pass overwrite=True or choose another directory/prefix"
            )
        for path in old:
            path.unlink()
            path.with_name(path.name[: -len(".tar")] + "_stats.json").unlink(missing_ok=True)

    @staticmethod
    def _encode_members(
        key: str, image_bytes: bytes, text: str, meta: dict[str, Any]
    ) -> list[tuple[str, bytes]]:
        record = {"key": key, "caption": text, **meta}
        return [
            (f"{key}.jpg", image_bytes),
            (f"{key}.txt", text.encode("utf-8")),
            (f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8")),
        ]

    def _shard_for(self, sample_bytes: int) -> _OpenShard:
        shard = self._shard
        if shard is not None and shard.samples > 0:
            too_many = shard.samples >= self.max_samples_per_shard
            too_big = _tar_file_bytes(shard.members_bytes + sample_bytes) > self.max_bytes_per_shard
            if too_many or too_big:
                self._finish_shard()
                shard = None
        if shard is None:
            shard = self._open_shard()
        return shard

    def _open_shard(self) -> _OpenShard:
        name = f"{self.prefix}{self._next_index:05d}.tar"
        self._next_index += 1
        self._shard = _OpenShard(self.out_dir / name)
        self._shard.failed.extend(self._pending_failures)
        self._pending_failures = []
        return self._shard

    def _finish_shard(self) -> None:
        shard, self._shard = self._shard, None
        if shard is None:
            return
        if shard.samples == 0:  # only failures landed here: no empty tar, keep them for the summary
            shard.tar.close()
            shard.tmp_path.unlink(missing_ok=True)
            self._pending_failures.extend(shard.failed)
            self._next_index -= 1
            return
        stats = shard.finish()
        self.stats.shards.append(shard.final_path.name)
        self.stats.samples += stats["successes"]
        self.stats.bytes += stats["bytes"]


# -- image re-encoding ------------------------------------------------------------------------------


def resized_size(width: int, height: int, *, resize: int | None, max_side: int | None) -> tuple[int, int]:
    """Target size keeping aspect: shorter side -> ``resize``, then longer side capped at ``max_side``.

    Images are only ever shrunk, never enlarged.
    """
    scale = 1.0
    if resize is not None:
        scale = min(scale, resize / min(width, height))
    if max_side is not None:
        scale = min(scale, max_side / max(width, height))
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_image(
    source: str | Path | bytes | Image.Image,
    *,
    resize: int | None = None,
    max_side: int | None = None,
    quality: int = 90,
) -> bytes:
    """Open ``source`` with :func:`seechat.data.images.load_image` (accepted formats only, EXIF
    orientation, transparency on white, RGB; Pillow's own size limit), optionally shrink, and
    return JPEG bytes.

    Raises :class:`~seechat.data.images.ImageError` (a ``ValueError``) for unreadable images.
    """
    image = load_image(source, max_pixels=None)
    size = resized_size(*image.size, resize=resize, max_side=max_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


# -- input tables ------------------------------------------------------------------------------------


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")


def _is_url(value: str) -> bool:
    return bool(_URL.match(value))


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, row dict) from a .tsv / .csv / .jsonl file."""
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".json"):
            try:
                yield from enumerate_jsonl(path)
            except JsonlError as e:
                raise ShardInputError(str(e)) from e
        elif suffix in (".tsv", ".csv"):
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                yield reader.line_num, row
        else:
            raise ShardInputError(f"{path}: unsupported input type {suffix!r} (use .tsv, .csv or .jsonl)")


def read_pair_table(
    path: str | os.PathLike[str],
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    key_column: str | None = None,
    image_root: str | os.PathLike[str] | None = None,
) -> Iterator[PairRecord]:
    """Stream :class:`PairRecord` s from a local TSV / CSV / JSONL table.

    Image paths are resolved against ``image_root`` (default: the table's directory). URLs are
    refused with :class:`ShardInputError` — this project never fetches from the network. Columns
    other than image / caption / key become metadata. Keys default to a 9-digit running index.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    for index, (line_no, row) in enumerate(_rows(path)):
        missing = [c for c in (image_column, caption_column) if c not in row]
        if missing:
            raise ShardInputError(f"{path}:{line_no}: missing column(s) {missing}; have {sorted(row)}")
        image = str(row[image_column])
        if _is_url(image):
            raise ShardInputError(
                f"{path}:{line_no}: image {image!r} is a URL; seechat does not download. "
                "Fetch images first (e.g. with img2dataset, which writes shards directly) "
                "or point the table at local files."
            )
        key = str(row[key_column]) if key_column else f"{index:09d}"
        skip = {image_column, caption_column, key_column}
        meta = {k: v for k, v in row.items() if k not in skip}
        meta["source_image"] = image
        yield PairRecord(key=key, image=root / image, text=str(row[caption_column]), meta=meta)


# -- conversion driver ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EncodeOptions:
    resize: int | None
    max_side: int | None
    quality: int


def _encode_record(job: tuple[PairRecord, _EncodeOptions]) -> tuple[PairRecord, bytes | None, str | None]:
    """Worker function: (record, jpeg bytes or None, failure reason or None). Picklable."""
    record, opts = job
    try:
        data = encode_image(record.image, resize=opts.resize, max_side=opts.max_side, quality=opts.quality)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return record, None, f"{type(e).__name__}: {e}"
    return record, data, None


def write_pair_shards(
    records: Iterable[PairRecord],
    out_dir: str | os.PathLike[str],
    *,
    image_size: int | None,
    max_side: int | None = None,
    quality: int = 90,
    max_samples_per_shard: int = 10_000,
    max_bytes_per_shard: int = 1 << 30,
    prefix: str = "",
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> ShardStats:
    """Re-encode every record's image to JPEG and write the pairs as shards in ``out_dir``.

    ``image_size`` shrinks the shorter side to that many pixels (``None``: keep), ``max_side``
    caps the longer side; aspect ratio is kept. Unreadable images are counted and listed in the
    stats files, not fatal. ``num_workers > 0`` decodes/re-encodes in that many processes (order
    of the output is still the input order).
    """
    opts = _EncodeOptions(resize=image_size, max_side=max_side, quality=quality)
    jobs = ((record, opts) for record in records)
    bar = _progress_bar(progress)
    with ShardWriter(
        out_dir, max_samples_per_shard, max_bytes_per_shard, prefix, overwrite=overwrite
    ) as writer:
        if num_workers > 0:
            with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
                _drain(pool.imap(_encode_record, jobs, chunksize=16), writer, bar)
        else:
            _drain(map(_encode_record, jobs), writer, bar)
    if bar is not None:
        bar.close()
    return writer.stats


def _drain(
    results: Iterable[tuple[PairRecord, bytes | None, str | None]], writer: ShardWriter, bar: Any
) -> None:
    for record, data, reason in results:
        if data is None:
            logger.warning("skipping %s (%s): %s", record.key, record.meta.get("source_image", ""), reason)
            writer.add_failure(record.key, reason or "unknown")
        else:
            writer.write(record.key, data, record.text, record.meta)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(failed=writer.stats.failures, refresh=False)


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="img", desc="shards", smoothing=0.1)
