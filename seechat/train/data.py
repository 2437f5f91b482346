"""Training batches for both stages, deterministic and resumable at any micro-batch.

- `kind: pairs` streams webdataset shards (`seechat.data.pairs.PairShardDataset`): each pair
  becomes a one-turn conversation, its instruction chosen by a hash of the sample key (so the
  choice is the same on every replay, whatever the RNG state).
- `kind: conversations` reads conversation files into memory-light records; an epoch is a seeded
  permutation cut into global batches (length-grouped within mega-batches to cut padding), and
  rank r takes the r-th contiguous part of each — so W processes see exactly the global batches
  one process would with a W-times larger batch, in the same order.

Either way the stream can be restarted at (epoch, micro-batches consumed) and yields exactly the
batches an uninterrupted run would have. Encoding (tokenise, label, load + preprocess images)
happens in DataLoader workers.

Inputs are not trusted. A sample that cannot be used — an unreadable, corrupt or oversized image
(a decompression bomb), an image path leading outside `data.image_root`, a shard sample larger
than `data.max_sample_mb`, nothing to supervise — is skipped with a warning naming it and why,
and appended to the run's skip log (`train/skipped/*.jsonl`), which `train/summary.json` counts.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from seechat.config import DataConfig
from seechat.data.collate import collate, collate_padding_free
from seechat.data.conversation import NoSupervisedTokensError
from seechat.data.images import ImageError, load_image
from seechat.data.instruct import Conversation, ImagePathError, image_path, iter_conversations
from seechat.data.pairs import PairShardDataset, log_skip
from seechat.data.processor import Encoded, SeeChatProcessor
from seechat.train.averaging import supervised_per_sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    batch_size: int  # per rank, per micro-batch
    seed: int
    rank: int
    world_size: int


def _stable_index(key: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % n


class PairToEncoded:
    """(image, caption) pair -> a one-turn conversation encoding; picklable for DataLoader workers."""

    def __init__(self, processor: SeeChatProcessor, instructions: tuple[str, ...]):
        self.processor = processor
        self.instructions = instructions

    def __call__(self, sample: dict) -> Encoded | None:
        instruction = self.instructions[_stable_index(sample["key"], len(self.instructions))]
        messages = [
            {"role": "user", "content": instruction},
            {"role": "assistant", "content": sample["text"]},
        ]
        try:
            return self.processor.encode_conversation(messages, [sample["image"]], sample_id=sample["key"])
        except NoSupervisedTokensError as e:
            log.warning("skipping pair: %s", e)
            return None


class UnusableImage(ValueError):
    """An image a training sample cannot use; the message says which and why."""


def open_training_image(root: Path, name: str) -> Image.Image:
    """The RGB image `name` of a data file under `root`, prepared exactly as serving and the shard
    writer prepare images (`seechat.data.images.load_image`: allow-listed formats, EXIF orientation,
    transparency on white). Raises UnusableImage for a path that leads outside the root, a missing,
    refused or undecodable file, or a decompression bomb (Pillow's limit, read from the header)."""
    try:
        return load_image(image_path(root, name), max_pixels=None)
    except ImagePathError as e:
        raise UnusableImage(str(e)) from None
    except ImageError as e:  # says why: refused format, undecodable, too large to decode safely
        raise UnusableImage(f"unreadable image {name!r}: {e}") from None


class ConversationDataset(Dataset):
    """Conversations -> encoded samples; a sample that cannot be used is None (logged, and counted
    in `skip_log_dir` when given)."""

    def __init__(
        self,
        records: list[Conversation],
        processor: SeeChatProcessor,
        image_roots: list[Path],
        skip_log_dir: Path | None = None,
        rank: int = 0,
    ):
        self.records = records
        self.processor = processor
        self.image_roots = image_roots  # per record
        self.skip_log_dir = skip_log_dir
        self.rank = rank

    def __len__(self) -> int:
        return len(self.records)

    def length_hint(self, i: int) -> int:
        """Cheap token-count proxy for length grouping (characters + image tokens)."""
        r = self.records[i]
        return sum(len(m.content) for m in r.messages) + len(r.images) * self.processor.num_image_tokens

    def __getitem__(self, i: int) -> Encoded | None:
        r = self.records[i]
        try:
            images = [open_training_image(self.image_roots[i], p) for p in r.images]
        except UnusableImage as e:
            return self._skip(i, str(e))
        messages = [{"role": m.role, "content": m.content} for m in r.messages]
        try:
            return self.processor.encode_conversation(messages, images, sample_id=r.id)
        except NoSupervisedTokensError as e:
            return self._skip(i, str(e))

    def _skip(self, i: int, reason: str) -> None:
        log.warning("skipping conversation %s: %s", self.records[i].id, reason)
        if self.skip_log_dir is not None:
            info = get_worker_info()
            name = f"skipped-conversations-r{self.rank}-w{info.id if info is not None else 0}.jsonl"
            log_skip(self.skip_log_dir / name, self.records[i].id, reason, str(self.image_roots[i]))
        return None


def load_conversation_dataset(
    cfg: DataConfig, processor: SeeChatProcessor, skip_log_dir: Path | None = None, rank: int = 0
) -> ConversationDataset:
    records: list[Conversation] = []
    roots: list[Path] = []
    for path in cfg.paths:
        root = Path(cfg.image_root) if cfg.image_root else Path(path).parent
        for conv in iter_conversations(path):
            records.append(conv)
            roots.append(root)
    if not records:
        raise ValueError(f"no conversations found in data.paths={list(cfg.paths)}")
    return ConversationDataset(records, processor, roots, skip_log_dir, rank)


def epoch_batches(
    dataset: ConversationDataset, spec: StreamSpec, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """This rank's micro-batches (lists of indices) for one epoch; a pure function of its inputs."""
    rng = random.Random(f"{spec.seed}/{epoch}")
    order = list(range(len(dataset)))
    rng.shuffle(order)
    global_batch = spec.batch_size * spec.world_size
    if group_by_length:
        mega = global_batch * 32
        chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
        order = [i for c in chunks for i in sorted(c, key=dataset.length_hint, reverse=True)]
    # Cut global batches first, then split each across ranks: the batches (and the shuffle below,
    # which draws on their count) are then those of one process with a W-times larger batch, the
    # epoch's short last batch included. Only a short batch that cannot give every rank a sample
    # is dropped, after the shuffle so that the others keep their order.
    rounds = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    if group_by_length:  # mix long and short batches over time
        rng.shuffle(rounds)
    return [_rank_share(r, spec.rank, spec.world_size) for r in rounds if len(r) >= spec.world_size]


def _rank_share(global_batch: list[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s contiguous part of one global batch; parts differ in size by at most one."""
    n, extra = divmod(len(global_batch), world_size)
    start = rank * n + min(rank, extra)
    return global_batch[start : start + n + (rank < extra)]


def collate_skipping(pad_id: int, samples: list[Encoded | None], padding_free: bool = False) -> dict | None:
    """Collate the samples that decoded (None marks a skipped one), padded or padding-free (one row,
    `seechat.data.collate.collate_padding_free`); None when none did."""
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    return collate_padding_free(kept) if padding_free else collate(kept, pad_id)


def conversation_batches(
    dataset: ConversationDataset,
    spec: StreamSpec,
    cfg: DataConfig,
    group_by_length: bool,
    epoch: int,
    start: int,
    padding_free: bool = False,
) -> Iterator[dict]:
    """Micro-batches of `epoch` from index `start` on; yields {} for a batch whose samples all failed."""
    plan = epoch_batches(dataset, spec, epoch, group_by_length)[start:]
    loader = DataLoader(
        dataset,
        batch_sampler=plan,
        num_workers=cfg.num_workers,
        collate_fn=partial(
            collate_skipping, dataset.processor.tokenizer.pad_token_id, padding_free=padding_free
        ),
        persistent_workers=False,
    )
    for batch in loader:
        yield batch or {}


def pair_batches(
    processor: SeeChatProcessor,
    spec: StreamSpec,
    cfg: DataConfig,
    epoch: int,
    start: int,
    skip_log_dir: Path | None,
    padding_free: bool = False,
) -> Iterator[dict]:
    dataset = PairShardDataset(
        list(cfg.paths),
        text_field=cfg.text_field,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=spec.seed,
        rank=spec.rank,
        world_size=spec.world_size,
        transform=PairToEncoded(processor, cfg.pair_instructions),
        skip_log_dir=skip_log_dir,
        max_sample_bytes=cfg.max_sample_mb << 20,
    )
    dataset.set_resume(epoch, start, spec.batch_size)
    loader = DataLoader(
        dataset,
        batch_size=spec.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=partial(collate_skipping, processor.tokenizer.pad_token_id, padding_free=padding_free),
    )
    for batch in loader:
        yield batch or {}


class BatchStream:
    """Endless micro-batches across epochs, tracking (epoch, batches_in_epoch) for exact resume;
    padded, or padding-free with `padding_free` (train.padding_free)."""

    def __init__(
        self,
        cfg: DataConfig,
        processor: SeeChatProcessor,
        spec: StreamSpec,
        group_by_length: bool,
        epoch: int = 0,
        batches_in_epoch: int = 0,
        skip_log_dir: Path | None = None,
        padding_free: bool = False,
    ):
        self.cfg, self.processor, self.spec = cfg, processor, spec
        self.group_by_length, self.padding_free = group_by_length, padding_free
        self.epoch, self.batches_in_epoch = epoch, batches_in_epoch
        self.skip_log_dir = skip_log_dir
        self.dataset = (
            load_conversation_dataset(cfg, processor, skip_log_dir, spec.rank)
            if cfg.kind == "conversations"
            else None
        )
        self._it: Iterator[dict] | None = None

    def _open(self) -> Iterator[dict]:
        if self.dataset is not None:
            return conversation_batches(
                self.dataset,
                self.spec,
                self.cfg,
                self.group_by_length,
                self.epoch,
                self.batches_in_epoch,
                self.padding_free,
            )
        return pair_batches(
            self.processor,
            self.spec,
            self.cfg,
            self.epoch,
            self.batches_in_epoch,
            self.skip_log_dir,
            self.padding_free,
        )

    def __next__(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self._it = self._open()
            try:
                batch = next(self._it)
                self.batches_in_epoch += 1
                return batch
            except StopIteration:
                if self.batches_in_epoch == 0:
                    break
                self.epoch, self.batches_in_epoch, self._it = self.epoch + 1, 0, None
        raise ValueError(f"the training data yields no batch (data.paths={list(self.cfg.paths)})")

    def __iter__(self) -> BatchStream:
        return self


def _usable(samples: list[Encoded | None]) -> list[Encoded]:
    return [s for s in samples if s is not None]


def eval_batches(
    cfg: DataConfig,
    processor: SeeChatProcessor,
    spec: StreamSpec,
    max_batches: int = 0,
    padding_free: bool = False,
) -> Iterator[dict]:
    """One pass over `cfg.eval_paths` in file order: this rank's part of each global batch.

    Every rank reads the whole held-out set and takes its contiguous share of each global batch
    (batch_size x world size), so all ranks run the same number of forwards (FSDP's forward is a
    collective); a global batch with fewer usable samples than ranks is skipped on every rank
    alike. `max_batches` > 0 stops after that many global batches. The loader draws its seed from
    its own generator, so evaluating leaves the training RNG (and exact resume) untouched.
    """
    if cfg.kind == "conversations":
        dataset = load_conversation_dataset(replace(cfg, paths=cfg.eval_paths), processor)
    else:
        dataset = PairShardDataset(
            list(cfg.eval_paths),
            text_field=cfg.text_field,
            shuffle_buffer=0,
            seed=spec.seed,
            shuffle_shards=False,
            rank=0,
            world_size=1,
            transform=PairToEncoded(processor, cfg.pair_instructions),
        )
    loader = DataLoader(
        dataset,
        batch_size=spec.batch_size * spec.world_size,
        num_workers=cfg.num_workers,
        collate_fn=_usable,
        generator=torch.Generator().manual_seed(spec.seed),
    )
    for i, samples in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        if len(samples) >= spec.world_size:
            share = _rank_share(samples, spec.rank, spec.world_size)
            yield collate_skipping(processor.tokenizer.pad_token_id, share, padding_free)


def count_supervised(batch: dict) -> int:
    """The batch's supervised next-token targets (`averaging.supervised_per_sequence`, summed)."""
    labels = batch.get("labels")
    return 0 if labels is None else int(supervised_per_sequence(labels, batch.get("cu_seq_lens")).sum())


def count_samples(batch: dict) -> int:
    """Samples in a padded batch (its rows) or a padding-free one (its sequences)."""
    cu = batch.get("cu_seq_lens")
    return batch["input_ids"].shape[0] if cu is None else cu.numel() - 1


def count_tokens(batch: dict) -> int:
    """Real (unpadded) tokens in a batch."""
    mask = batch.get("attention_mask")
    return batch["input_ids"].numel() if mask is None else int(mask.sum())


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
