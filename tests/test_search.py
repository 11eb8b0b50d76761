"""`search.last_true`: the last integer of a monotone predicate, with few calls of it."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from turboserve.search import last_true


@given(lo=st.integers(0, 50), extra=st.integers(0, 10_000), span=st.integers(0, 20_000))
def test_finds_the_last_true_within_the_cap(lo, extra, span):
    threshold, cap = lo + extra, lo + span
    calls = []

    def ok(n):
        calls.append(n)
        return n <= threshold

    assert last_true(ok, lo, cap) == min(threshold, cap)
    assert all(lo < n <= cap for n in calls)  # never asked at lo (given) or past the cap
    assert len(calls) <= 2 * math.log2(max(2, cap)) + 2


def test_a_predicate_true_everywhere_stops_at_the_cap():
    assert last_true(lambda n: True, 1, 1000) == 1000
    assert last_true(lambda n: True, 7, 7) == 7
