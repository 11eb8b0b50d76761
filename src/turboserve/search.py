"""Searches over a monotone integer predicate: doubling, then bisection.

In: a predicate true up to some point and false after it (fitting more sessions on a GPU,
more copies of a trace under a GPU count), a start where it is true, and a bound. Out: the
last integer where it is still true, with O(log n) calls of it (each call is the costly
part: a latency evaluation, a scan of a trace's demand).
"""

from __future__ import annotations

from typing import Callable


def last_true(ok: Callable[[int], bool], lo: int, cap: int) -> int:
    """The largest n in [lo, cap] with ok(n), given ok(lo) and ok monotone (true, then false)."""
    hi = max(1, 2 * lo)
    while hi <= cap and ok(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, cap + 1)
    while hi - lo > 1:  # ok(lo), not ok(hi) (or hi past the cap)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
