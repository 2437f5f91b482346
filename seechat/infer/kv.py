"""Key/value memory for the serving engine: the running batch's KV buffers and the prefix cache.

`BatchKV` holds the keys and values of B sequences decoded together. Rows are aligned on the
right: every row writes its next token into the same column, and a row's earlier tokens sit
wherever its prompt put them, with `mask` marking which columns are real. A row may have holes
(left padding, or a gap between a reused prefix and a shorter suffix); RoPE was applied when each
key was written, so a hole only needs masking, and a row's next position is simply how many real
tokens it has. Requests join by left-padding the shorter side and concatenating along the batch,
and leave by selecting rows, so the batch changes every step without recomputing anything.

`PrefixCache` keeps the KV of finished sequences keyed by their content (token ids, with image
tokens replaced by a tag of the image's pixels) so that the next turn of a conversation, or any
request sharing a prefix, prefills only what is new. It is a small LRU bounded in bytes. Every
entry belongs to a scope (the server uses one per API key): a lookup only ever matches entries of
its own scope, so reuse — visible in `cached_tokens` and in timing — never reveals another
scope's prompts.

Neither knows the model; they hold tensors of shape (B, H_kv, T, D_head) per layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (B, H, T, D)


class BatchKV:
    def __init__(self, layers: Layers, mask: torch.Tensor, next_pos: torch.Tensor, headroom: int = 32):
        """`layers`: per-layer (K, V) of shape (B, H, T, D); `mask` (B, T) marks real columns;
        `next_pos` (B,) is each row's next position id. Copied into buffers with `headroom` spare
        columns; masked entries are zeroed so that garbage from padding can never leak (0 * NaN)."""
        b, t = mask.shape
        self.length = t
        cap = t + headroom
        keep = mask.bool()
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for k, v in layers:
            kb = k.new_zeros((b, k.shape[1], cap, k.shape[3]))
            vb = v.new_zeros((b, v.shape[1], cap, v.shape[3]))
            w = keep[:, None, :, None]
            kb[:, :, :t] = torch.where(w, k, 0)
            vb[:, :, :t] = torch.where(w, v, 0)
            self.keys.append(kb)
            self.values.append(vb)
        self.mask = torch.zeros((b, cap), dtype=torch.bool, device=mask.device)
        self.mask[:, :t] = keep
        self.next_pos = next_pos.clone()
        self._dense: bool | None = None

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @property
    def dense(self) -> bool:
        """True when no row has a hole: attention then needs no mask at all."""
        if self._dense is None:
            self._dense = bool(self.mask[:, : self.length].all())
        return self._dense

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    def reserve(self, extra: int = 1) -> None:
        """Make room for `extra` more columns (grows by half again, so appends are amortised O(1))."""
        need = self.length + extra
        if need <= self.capacity:
            return
        cap = max(need, self.capacity + self.capacity // 2 + 16)
        self._resize(cap)

    def _resize(self, cap: int) -> None:
        t = self.length
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            kb = k.new_zeros((k.shape[0], k.shape[1], cap, k.shape[3]))
            vb = v.new_zeros((v.shape[0], v.shape[1], cap, v.shape[3]))
            kb[:, :, :t] = k[:, :, :t]
            vb[:, :, :t] = v[:, :, :t]
            self.keys[i], self.values[i] = kb, vb
        mask = self.mask.new_zeros((self.batch_size, cap))
        mask[:, :t] = self.mask[:, :t]
        self.mask = mask

    def advance(self, keep: int = 1, written: int = 1) -> None:
        """After a step wrote `written` columns for every row: keep the first `keep` of them (the
        rest were rejected draft tokens; their columns are reused by the next step)."""
        self.mask[:, self.length : self.length + keep] = True
        self.mask[:, self.length + keep : self.length + written] = False
        self.length += keep
        self.next_pos += keep

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (finished requests leave), then drop columns no row uses any more."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.keys = [k.index_select(0, idx) for k in self.keys]
        self.values = [v.index_select(0, idx) for v in self.values]
        self.mask = self.mask.index_select(0, idx)
        self.next_pos = self.next_pos.index_select(0, idx)
        self._dense = None
        self._trim()

    def _trim(self) -> None:
        used = self.mask[:, : self.length].any(0)
        if not bool(used.any()):
            return
        first = int(used.int().argmax())
        if first == 0:
            return
        t = self.length - first
        self.keys = [k[:, :, first:].contiguous() for k in self.keys]
        self.values = [v[:, :, first:].contiguous() for v in self.values]
        self.mask = self.mask[:, first:].contiguous()
        self.length = t

    def merge(self, other: BatchKV) -> None:
        """Append `other`'s rows, left-padding whichever side is shorter."""
        t = max(self.length, other.length)
        cap = t + max(self.capacity - self.length, other.capacity - other.length, 16)
        a, b = self._padded(cap, t), other._padded(cap, t)
        self.keys = [torch.cat([x, y]) for x, y in zip(a[0], b[0], strict=True)]
        self.values = [torch.cat([x, y]) for x, y in zip(a[1], b[1], strict=True)]
        self.mask = torch.cat([a[2], b[2]])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.length = t
        self._dense = None

    def _padded(self, cap: int, t: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        shift = t - self.length  # new empty columns on the left

        def pad(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros((*x.shape[:2], cap, x.shape[3]))
            out[:, :, shift:t] = x[:, :, : self.length]
            return out

        mask = self.mask.new_zeros((self.batch_size, cap))
        mask[:, shift:t] = self.mask[:, : self.length]
        return [pad(k) for k in self.keys], [pad(v) for v in self.values], mask

    def row(self, i: int) -> Layers:
        """Row `i`'s real keys/values, holes removed: per layer (1, H, n, D)."""
        cols = self.mask[i, : self.length].nonzero().squeeze(1)
        return [
            (k[i : i + 1, :, cols].clone(), v[i : i + 1, :, cols].clone())
            for k, v in zip(self.keys, self.values, strict=True)
        ]


def kv_peak_tokens(width: int, remaining: Sequence[int]) -> int:
    """An upper bound on the running batch's KV size (rows x columns) from now until every row has
    finished: rows are aligned on the right, so each decode step adds one column to every row, and
    a row with r tokens left stays at most r more steps. `width`: columns now; `remaining`: tokens
    each row may still generate. With r sorted descending, k rows are left after r_k more steps."""
    rs = sorted(remaining, reverse=True)
    return max(((k + 1) * (width + r) for k, r in enumerate(rs)), default=0)


class PrefixCache:
    """Content-keyed KV of finished sequences (LRU, bounded in bytes), partitioned by scope.

    A key is a 1-D long tensor: token ids, with each image's tokens replaced by a negative tag
    derived from the image's pixels, so that the same text about a different image never matches.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[torch.Tensor, Layers, int, str]] = OrderedDict()
        self._next_id = 0
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: torch.Tensor, scope: str = "") -> tuple[int, Layers | None]:
        """Longest common prefix with any stored sequence of `scope`: (length, per-layer KV views of it)."""
        best, best_id = 0, None
        for eid, (k, _, _, sc) in self._entries.items():
            m = min(len(k), len(key))
            if m <= best or sc != scope:
                continue
            eq = k[:m] == key[:m]
            n = m if bool(eq.all()) else int(eq.int().argmin())
            if n > best:
                best, best_id = n, eid
        if best_id is None:
            return 0, None
        self._entries.move_to_end(best_id)
        layers = self._entries[best_id][1]
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in layers]

    def store(self, key: torch.Tensor, layers: Layers, scope: str = "") -> None:
        if self.max_bytes <= 0 or len(key) == 0:
            return
        size = sum(k.numel() * k.element_size() * 2 for k, _ in layers)
        if size > self.max_bytes:
            return
        for eid, (k, _, s, sc) in list(self._entries.items()):
            if sc != scope:
                continue
            if len(k) >= len(key) and bool((k[: len(key)] == key).all()):
                self._entries.move_to_end(eid)  # already covered by a longer sequence
                return
            if len(k) < len(key) and bool((key[: len(k)] == k).all()):
                del self._entries[eid]  # the new sequence extends it
                self.bytes -= s
        self._entries[self._next_id] = (key.clone(), layers, size, scope)
        self._next_id += 1
        self.bytes += size
        while self.bytes > self.max_bytes and self._entries:
            _, (_, _, s, _) = self._entries.popitem(last=False)
            self.bytes -= s


class SlotKV:
    """The running batch's KV in a fixed pool of slots, for the static decode path (see
    `seechat.infer.static_decode`): per layer one (slots, H, capacity, D) buffer allocated once,
    row i of the batch in slot i, its tokens at columns [0, its length) — a column is a position,
    so no row is padded to the longest and nothing is masked but the columns past each row's end.
    Buffers never move, which is what a captured CUDA graph needs; rows stay packed in slots
    [0, batch_size) (a leaving row's slot is refilled by moving later rows down), so a step runs
    over the first batch_size slots only.

    The same interface as `BatchKV` for the engine: `length`, `batch_size`, `reserve`, `advance`,
    `select`, `merge` (of a prefilled `BatchKV`) and `row`.
    """

    def __init__(
        self,
        slots: int,
        capacity: int,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.next_pos = torch.zeros(slots, dtype=torch.long, device=device)  # (slots,) step input
        self.lens: list[int] = []  # host copy of next_pos[:batch_size]: no device reads to schedule

    @staticmethod
    def size(slots: int, capacity: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes such a pool holds (keys and values of every layer), before allocating it."""
        return 2 * layers * slots * kv_heads * capacity * head_dim * dtype.itemsize

    @classmethod
    def like(cls, slots: int, capacity: int, kv: BatchKV) -> SlotKV:
        """An empty pool whose layers, heads, head size, dtype and device are `kv`'s."""
        k0 = kv.keys[0]
        return cls(slots, capacity, len(kv.keys), k0.shape[1], k0.shape[3], k0.dtype, k0.device)

    @property
    def slots(self) -> int:
        return self.next_pos.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return len(self.lens)

    @property
    def length(self) -> int:
        return max(self.lens, default=0)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)

    def clear(self) -> None:
        self.lens = []
        self.next_pos.zero_()

    def reserve(self, extra: int = 1) -> None:
        if self.length + extra > self.capacity:
            raise RuntimeError(
                f"a row would reach {self.length + extra} tokens; the static KV holds {self.capacity} per "
                "row (the engine's max_model_len)"
            )

    def advance(self, keep: int = 1, written: int = 1) -> None:
        """Keep the first `keep` of the `written` columns each row just wrote; the rest lie past the
        row's end, where the next step overwrites them."""
        b = self.batch_size
        self.lens = [n + keep for n in self.lens]
        self.next_pos[:b] += keep

    def select(self, rows: list[int]) -> None:
        for j, src in enumerate(rows):
            if src != j:  # rows only move down: slot j is free or already moved
                n = self.lens[src]
                for k in (*self.keys, *self.values):
                    k[j, :, :n] = k[src, :, :n]
        self.lens = [self.lens[i] for i in rows]
        b = len(rows)
        self.next_pos[:b] = torch.tensor(self.lens, dtype=torch.long)
        self.next_pos[b:] = 0  # free slots step harmlessly at position 0 when a graph covers them

    def merge(self, other: BatchKV) -> None:
        """Append `other`'s rows (prefilled, possibly with holes) as packed slots."""
        b = self.batch_size
        if b + other.batch_size > self.slots:
            raise RuntimeError(f"{b + other.batch_size} rows; the static KV has {self.slots} slots")
        for i in range(other.batch_size):
            layers = other.row(i)
            n = layers[0][0].shape[2]
            if n > self.capacity:
                raise RuntimeError(f"a row of {n} tokens; the static KV holds {self.capacity} per row")
            for (k, v), kb, vb in zip(layers, self.keys, self.values, strict=True):
                kb[b + i, :, :n] = k[0]
                vb[b + i, :, :n] = v[0]
            self.lens.append(n)
            self.next_pos[b + i] = n

    def row(self, i: int) -> Layers:
        n = self.lens[i]
        return [
            (k[i : i + 1, :, :n].clone(), v[i : i + 1, :, :n].clone())
            for k, v in zip(self.keys, self.values, strict=True)
        ]
