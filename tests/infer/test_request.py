"""Stop strings in linear time give exactly what re-scanning the whole text gives; the KV budget's
bound."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seechat.infer.kv import kv_peak_tokens
from seechat.infer.request import StopStrings


def find_stop(text: str, stops) -> int | None:
    """The reference: earliest start of any stop string in the whole text."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops) -> int:
    """The reference: longest suffix of the text that is a proper prefix of a stop string."""
    return max([k for s in stops if s for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stops=st.lists(st.text("abc", max_size=7), max_size=4),
    pieces=st.lists(st.text("abc", max_size=4), max_size=12),
)
def test_stop_strings_match_a_rescan_of_the_whole_text(stops, pieces):
    matcher, text = StopStrings(stops), ""
    for piece in pieces:
        text += piece
        cut = matcher.feed(piece)
        assert cut == find_stop(text, stops)
        if cut is not None:
            return  # the engine stops feeding at the first hit
        assert matcher.held == held_back(text, stops)


def test_long_stop_strings_cost_linear_time():
    """A 100,000-character stop string that almost matches over a 100,000-character reply: the
    naive hold-back check is ~10^10 steps; the automaton's is about 2 x 10^5 (this returns)."""
    stop = "a" * 99_999 + "b"
    matcher = StopStrings([stop])
    for _ in range(100):
        assert matcher.feed("a" * 1000) is None
    assert matcher.held == 99_999
    assert matcher.feed("b") == 1


def test_kv_peak_bound():
    assert kv_peak_tokens(10, []) == 0
    assert kv_peak_tokens(10, [5]) == 15
    # three rows: all three for 2 more steps (3 x 12), two of them for 4 (2 x 14), one for 20 (30)
    assert kv_peak_tokens(10, [2, 20, 4]) == 36
    assert kv_peak_tokens(100, [2, 20, 4]) == 306
