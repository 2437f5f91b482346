"""BatchKV joins, leaves and trims rows without disturbing any row; PrefixCache finds prefixes."""

from __future__ import annotations

import torch

from seechat.infer.kv import BatchKV, PrefixCache


def _kv(lengths: list[int], width: int, seed: int) -> tuple[BatchKV, list[torch.Tensor]]:
    """Rows right-aligned in `width` columns; returns the batch and each row's real keys (H, n, D)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    k = torch.randn(b, 2, width, 4, generator=g)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, width - n :] = True
    kv = BatchKV([(k, k + 1)], mask, torch.tensor(lengths))
    return kv, [k[i, :, width - n :] for i, n in enumerate(lengths)]


def _rows(kv: BatchKV) -> list[torch.Tensor]:
    return [kv.row(i)[0][0][0] for i in range(kv.batch_size)]


def test_padding_is_zeroed_and_rows_keep_their_tokens():
    kv, truth = _kv([3, 5], 5, 0)
    assert torch.all(kv.keys[0][0, :, :2] == 0)
    for got, want in zip(_rows(kv), truth, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert kv.row(0)[0][1].equal(kv.row(0)[0][0] + 1)  # values travel with keys


def test_merge_left_pads_the_shorter_side_and_select_trims():
    a, ta = _kv([2, 4], 4, 1)
    b, tb = _kv([7], 7, 2)
    a.merge(b)
    assert a.length == 7 and a.batch_size == 3 and a.next_pos.tolist() == [2, 4, 7]
    for got, want in zip(_rows(a), ta + tb, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    a.select([0, 1])  # the long row leaves: its leading columns are no longer used by anyone
    assert a.length == 4
    for got, want in zip(_rows(a), ta, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_reserve_and_advance_grow_the_buffers():
    kv, truth = _kv([3], 3, 3)
    cap = kv.capacity
    for _ in range(cap):
        kv.reserve(1)
        kv.keys[0][:, :, kv.length] = 7.0
        kv.advance()
    assert kv.length == 3 + cap and kv.capacity >= kv.length and int(kv.next_pos) == 3 + cap
    row = kv.row(0)[0][0][0]
    torch.testing.assert_close(row[:, :3], truth[0])
    assert torch.all(row[:, 3:] == 7.0)


def test_prefix_cache_longest_match_extension_and_eviction():
    layer = lambda n: [(torch.ones(1, 2, n, 4), torch.ones(1, 2, n, 4))]  # noqa: E731
    cache = PrefixCache(max_bytes=3 * 2 * 2 * 8 * 4 * 4)  # room for 24 tokens of this layer shape
    cache.store(torch.tensor([1, 2, 3, 4]), layer(4))
    n, kv = cache.lookup(torch.tensor([1, 2, 3, 9, 9]))
    assert n == 3 and kv[0][0].shape[2] == 3
    assert cache.lookup(torch.tensor([5, 6]))[0] == 0
    cache.store(torch.tensor([1, 2, 3, 4, 5, 6]), layer(6))  # extends the first entry: replaces it
    assert len(cache) == 1 and cache.lookup(torch.tensor([1, 2, 3, 4, 5, 6, 7]))[0] == 6
    cache.store(torch.tensor([1, 2]), layer(2))  # already covered
    assert len(cache) == 1
    for i in range(4):
        cache.store(torch.tensor([100 + i] * 8), layer(8))
    assert cache.bytes <= cache.max_bytes and len(cache) == 3
    assert cache.lookup(torch.tensor([1, 2, 3]))[0] == 0  # the oldest went first
