"""Demand of a trace in GPUs, and rescaling a trace so its peak needs a given GPU count.

In: `SessionRecord`s, a latency model and a shape (and optionally an SLO, default the
shape's chunk playback time). Out: `demand_curve` (time -> GPUs needed; `demand_steps`, the
same as numpy arrays, summed vectorised with the same floats), `peak_demand`, and
`fit_to_gpus`, which multiplies every arrival time by one factor (durations and the session
mix unchanged) so that the peak demand needs exactly `gpus` GPUs.

Demand is computed over *nominal* timelines: a session is active from its arrival for its
first period's `active_s`, idle for `idle_s`, and so on, as if every chunk came on time
(each chunk taking its playback time, or its SLO where an explicit SLO is longer).
Each active session occupies `1 / capacity(shape, slo, its steps)` of a GPU (capacity from
the latency model at a full window); the GPUs needed at an instant are the sum, rounded up
by the caller where whole GPUs matter. This is the perfect-packing demand: the same lower
bound the oracle uses.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np

from ..types import SessionRecord


class TraceTooSmall(ValueError):
    """Even with every session arriving at once the trace's peak needs fewer GPUs than asked."""


def active_intervals(r: SessionRecord, factor: float = 1.0, pace: float = 1.0) -> list[tuple[float, float]]:
    """Nominal [start, end) seconds of each active period, arrival scaled by `factor`,
    active spans stretched by `pace` (see `slo_pace`)."""
    t = r.arrival_s * factor
    out = []
    for p in r.periods:
        span = p.active_s * pace
        out.append((t, t + span))
        t += span + p.idle_s
    return out


def slo_pace(model, shape: str, slo_ms: float | None) -> float:
    """How much longer than playback a period lasts when each chunk takes its SLO: 1 at the
    default SLO (the chunk's playback time), slo / playback for an explicit SLO above it.
    A shape too slow for playback (wan14b-480p on one H100) is served at an explicit SLO,
    and its sessions then stay active that much longer than the trace's playback times:
    fitting and bounding on playback times would undercount its demand by the same factor."""
    if slo_ms is None:
        return 1.0
    return max(1.0, slo_ms / model.shape(shape).chunk_ms)


def session_weights(records: Sequence[SessionRecord], model, shape: str, slo_ms: float | None = None) -> list[float]:
    """GPUs one active session of each record occupies: 1 / capacity at its step count."""
    slo = slo_ms if slo_ms is not None else model.shape(shape).chunk_ms
    cache: dict[int, float] = {}
    out = []
    for r in records:
        steps = r.spec.steps
        w = cache.get(steps)
        if w is None:
            cap = model.capacity(shape, slo, steps)
            if cap <= 0:
                raise ValueError(
                    f"shape {shape!r} cannot serve even one session within {slo:g} ms per chunk "
                    f"at {steps} steps; give a larger --slo-ms or a faster profile"
                )
            w = cache[steps] = 1.0 / cap
        out.append(w)
    return out


def demand_curve(records: Sequence[SessionRecord], model, shape: str, slo_ms: float | None = None,
                 factor: float = 1.0, weights: list[float] | None = None) -> list[tuple[float, float]]:
    """Step function of GPUs needed: [(time_s, gpus from then on)], at every change."""
    times, levels = demand_steps(records, model, shape, slo_ms, factor, weights)
    return list(zip(times.tolist(), levels.tolist()))


def peak_demand(records: Sequence[SessionRecord], model, shape: str, slo_ms: float | None = None,
                factor: float = 1.0, weights: list[float] | None = None) -> tuple[float, float]:
    """(peak GPUs needed, time of the peak: the first, where it is reached more than once)."""
    times, levels = demand_steps(records, model, shape, slo_ms, factor, weights)
    if not len(levels):
        return 0.0, 0.0
    i = int(np.argmax(levels))
    return float(levels[i]), float(times[i])


def peak_demand_apart(records: Sequence[SessionRecord], model, shape: str,
                      slo_ms: float | None = None) -> int:
    """Peak over time of the sum, over step counts (the shape's coalescing groups), of each
    group's GPUs rounded up: what a placement that keeps every group on GPUs of its own
    needs (turboserve's, mostly). `peak_demand` rounds up only the sum, as if groups
    shared GPUs at no cost; the two differ by less than one GPU per extra group."""
    by_steps: dict[int, list[SessionRecord]] = {}
    for r in records:
        by_steps.setdefault(r.spec.steps, []).append(r)
    parts = [demand_steps(rs, model, shape, slo_ms) for rs in by_steps.values()]
    times = np.unique(np.concatenate([t for t, _ in parts])) if parts else np.zeros(0)
    total = np.zeros(times.size)
    for t, levels in parts:
        i = np.searchsorted(t, times, side="right") - 1  # each group's level at each time
        level = np.where(i >= 0, levels[np.clip(i, 0, None)], 0.0)
        total += np.ceil(level - 1e-9)
    return int(total.max()) if total.size else 0


def demand_steps(records: Sequence[SessionRecord], model, shape: str, slo_ms: float | None = None,
                 factor: float = 1.0, weights: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`demand_curve` as two arrays: the times at which demand changes, and the GPUs needed
    from each on. Each active period adds its session's weight at its start and takes it
    away at its end; at each time the level is the running sum of those changes in the order
    of (time, change), floored at 0 (within 1e-9 of 0 counts as 0: float residue)."""
    if weights is None:
        weights = session_weights(records, model, shape, slo_ms)
    return _levels(*_changes(records, weights, factor, slo_pace(model, shape, slo_ms)))


def _changes(records: Sequence[SessionRecord], weights: Sequence[float], factor: float,
             pace: float) -> tuple[np.ndarray, np.ndarray]:
    """(times, changes) sorted by (time, change): +weight where an active period starts,
    -weight where it ends."""
    ts: list[float] = []
    ds: list[float] = []
    for r, w in zip(records, weights):
        for start, end in active_intervals(r, factor, pace):
            if end > start:
                ts += (start, end)
                ds += (w, -w)
    t = np.array(ts, dtype=float)
    d = np.array(ds, dtype=float)
    order = np.lexsort((d, t))
    return t[order], d[order]


SPARSE_CHANGES_PER_IDLE = 16  # fewer changes than this per idle instant: the loop is faster


def _levels(t: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels at each distinct time of sorted changes `d` at times `t`, equal to
    `_levels_loop`'s: float sums in the same order (cumulative sums restarted where the
    level was floored), vectorised between the instants at which nothing is active."""
    n = len(t)
    if n == 0:
        return t, d
    last = np.flatnonzero(np.append(t[1:] != t[:-1], True))  # each time's last change
    active = np.cumsum(np.where(d > 0, 1, -1))
    idle_at = last[active[last] == 0]  # nothing active after these changes
    if SPARSE_CHANGES_PER_IDLE * len(idle_at) > n:
        return _levels_loop(t, d)  # sparse: numpy per segment would cost more than the loop
    levels = np.empty(len(last))
    start = 0  # first change of the segment
    k = 0  # first time of the segment, in `last`
    carry = 0.0
    for end in idle_at.tolist():
        cs = np.cumsum(np.concatenate(([carry], d[start:end + 1])))[1:]
        j = int(np.searchsorted(last, end, side="right"))
        seg = cs[last[k:j] - start]
        if j - k > 1 and not (seg[:-1] > 1e-9).all():
            return _levels_loop(t, d)  # a level near 0 while sessions are active: no shortcut
        levels[k:j] = seg
        carry = levels[j - 1] = seg[-1] if seg[-1] > 1e-9 else 0.0
        start, k = end + 1, j
    if k != len(last):  # the changes do not end with nothing active (negative weights)
        return _levels_loop(t, d)
    return t[last], levels


def _levels_loop(t: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference: one change at a time."""
    times: list[float] = []
    levels: list[float] = []
    level = 0.0
    i = 0
    n = len(t)
    tl, dl = t.tolist(), d.tolist()
    while i < n:
        now = tl[i]
        while i < n and tl[i] == now:
            level += dl[i]
            i += 1
        level = max(0.0, level) if abs(level) > 1e-9 else 0.0
        times.append(now)
        levels.append(level)
    return np.array(times, dtype=float), np.array(levels, dtype=float)


def peak_concurrent_active(records: Sequence[SessionRecord]) -> int:
    events = []
    for r in records:
        for start, end in active_intervals(r):
            if end > start:
                events.append((start, 1))
                events.append((end, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    return peak


def scale_arrivals(records: Sequence[SessionRecord], factor: float) -> list[SessionRecord]:
    return [replace(r, arrival_s=round(r.arrival_s * factor, 6)) for r in records]


def fit_factor(records: Sequence[SessionRecord], model, shape: str, gpus: int, slo_ms: float | None = None) -> float:
    """Arrival-time factor whose peak demand needs `gpus` GPUs (gpus - 1 < peak <= gpus, or
    peak == gpus - 1 where the step function of demand jumps over that interval). Larger
    factors spread arrivals out (lower peak); binary search on its logarithm."""
    if gpus < 1:
        raise ValueError(f"--fit-gpus must be >= 1, got {gpus}")
    if not records:
        raise ValueError("cannot fit an empty trace")
    weights = session_weights(records, model, shape, slo_ms)

    def peak(f: float) -> float:
        return peak_demand(records, model, shape, slo_ms, f, weights)[0]

    # the least demand a trace can have is its biggest session alone
    if max(weights) > gpus + 1e-9:
        raise ValueError(f"one session of {shape!r} needs more than {gpus} GPUs")
    top = peak(0.0)  # every session arriving at once: the most demand the trace can make
    if top <= gpus - 1 + 1e-9:
        raise TraceTooSmall(
            f"the trace is too small for {gpus} GPUs of {shape!r}: even with every session "
            f"arriving at once its peak demand is {top:.2f} GPUs"
        )
    if top <= gpus + 1e-9:
        # any compression fits; take the least one that still needs `gpus` GPUs
        return _boundary(lambda f: peak(f) > gpus - 1 + 1e-9, want_true_below=True)
    return _boundary(lambda f: peak(f) <= gpus + 1e-9, want_true_below=False)


def _boundary(pred, want_true_below: bool) -> float:
    """Binary search on log(factor) for where `pred` flips. With want_true_below, pred holds
    for small factors and the largest such factor is returned; otherwise pred holds for large
    factors and the smallest such factor is returned."""
    def good(f: float) -> bool:
        return pred(f)

    inside, outside = 1.0, 1.0
    if want_true_below:
        while not good(inside):
            inside /= 2.0
        outside = inside * 2.0
        while good(outside):
            inside, outside = outside, outside * 2.0
            if outside > 1e12:
                return inside
    else:
        while not good(inside):
            inside *= 2.0
            if inside > 1e12:
                raise ValueError("cannot spread the trace enough to fit the target")
        outside = inside / 2.0
        while good(outside):
            inside, outside = outside, outside / 2.0
    for _ in range(80):
        mid = math.sqrt(inside * outside)
        if good(mid):
            inside = mid
        else:
            outside = mid
        if max(inside, outside) / min(inside, outside) < 1 + 1e-7:
            break
    return inside


def fit_to_gpus(records: Sequence[SessionRecord], model, shape: str, gpus: int, slo_ms: float | None = None) -> list[SessionRecord]:
    """Records with arrival times scaled so the peak demand needs `gpus` GPUs of `shape`."""
    f = fit_factor(records, model, shape, gpus, slo_ms)
    out = scale_arrivals(records, f)
    # rounding arrivals to microseconds can make two edges meet; nudge until the peak fits
    for _ in range(20):
        if peak_demand(out, model, shape, slo_ms)[0] <= gpus + 1e-9:
            break
        f *= 1.0 + 1e-5
        out = scale_arrivals(records, f)
    return out
