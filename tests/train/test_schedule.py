"""The one warmup + cosine schedule (used by the training loop and the mini-expert recipes)."""

from __future__ import annotations

import pytest

from seechat.train.schedule import warmup_cosine


def test_warms_up_linearly_then_decays_to_the_floor() -> None:
    f = [warmup_cosine(s, 10, 100, 0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.55)  # half-way down the cosine
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[100] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)  # stays at the floor after total


def test_no_warmup_starts_at_the_peak() -> None:
    assert warmup_cosine(0, 0, 50, 0.0) == 1.0
    assert warmup_cosine(50, 0, 50, 0.0) == pytest.approx(0.0)
    assert warmup_cosine(3, 0, 1, 0.2) == pytest.approx(0.2)  # total <= warmup: no division by zero
