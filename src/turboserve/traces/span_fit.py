"""Fit a trace's peak to a GPU count without moving it off its time axis.

In: `SessionRecord`s, a latency model and shape (and SLO), a GPU count, a span in seconds,
a seed. Out: `fit_in_span` returns the records to replay (arrivals within the span) and a
`SpanFit` saying what was done.

`rescale.fit_to_gpus` fits by multiplying arrival times: the workload keeps every session
but its length follows the fit. A public trace fitted that way to a small cluster of a big
shape stretches to tens of hours, and to a big cluster of a small shape shrinks to
minutes, so a one-hour replay sees a thin slice of it, or a single ramp and a drain. Here
the time axis is fixed instead and the population is scaled, as a service with fewer or
more users of the same behaviour would see it:

1. Arrivals are scaled once so the trace spans `span_s` (the last arrival at `span_s`).
2. Too small (even every session needs fewer than `gpus` GPUs at the peak): copies of the
   trace are overlaid, each session of copy j >= 1 arriving at its original time plus a
   uniform jitter in [-jitter_s, +jitter_s] (clipped into the span), so the copies' users
   keep the trace's load over the hour without moving in lockstep. Copies are added until
   the peak exceeds `gpus`.
3. Thinning: each session draws a uniform number (seeded); the largest share of sessions
   in draw order whose peak still fits is kept. Shares are nested, so the peak grows with
   the share and a bisection finds it; adding the next session would exceed `gpus`, and no
   session needs more than one GPU, so the kept peak is within (gpus - 1, gpus].
Durations, periods and specs are never changed; copies get ids `<id>~<j>`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..search import last_true
from ..types import SessionRecord
from .rescale import TraceTooSmall, peak_demand, session_weights

MAX_COPIES = 256  # a trace this much too small for the target is the wrong trace
DEFAULT_COPY_JITTER_S = 60.0


@dataclass(frozen=True)
class SpanFit:
    time_factor: float  # arrivals were multiplied by this to span the span
    copies: int  # overlaid copies of the trace (1 = the trace alone)
    kept: int  # sessions kept after thinning
    offered: int  # sessions before thinning (all copies)
    peak_gpus: float  # peak demand of the kept sessions

    def describe(self) -> str:
        return (f"arrivals scaled by {self.time_factor:.4f} to the span, {self.copies} cop"
                f"{'y' if self.copies == 1 else 'ies'}, {self.kept} of {self.offered} sessions kept: "
                f"peak {self.peak_gpus:.2f} GPUs")


def _copy(records: Sequence[SessionRecord], j: int, span_s: float, jitter_s: float,
          rng: np.random.Generator) -> list[SessionRecord]:
    shift = rng.uniform(-jitter_s, jitter_s, size=len(records))
    return [replace(r, id=f"{r.id}~{j}", arrival_s=round(min(span_s, max(0.0, r.arrival_s + d)), 6))
            for r, d in zip(records, shift)]


def _copies_needed(base: list[SessionRecord], weights: list[float], model, shape: str, gpus: int,
                   span_s: float, slo_ms: float | None, seed: int, jitter_s: float) -> int:
    """The fewest copies (the trace itself is copy 1) whose overlay needs more than `gpus`
    GPUs at its peak. Copy j is drawn j-th from the seed, so overlays are nested and the peak
    grows with the count: doubling then bisecting finds it with a few peak scans."""
    rng = np.random.default_rng(seed)
    drawn: list[list[SessionRecord]] = [list(base)]

    def exceeds(k: int) -> bool:
        while len(drawn) < k:
            drawn.append(_copy(base, len(drawn), span_s, jitter_s, rng))
        pool = [r for c in drawn[:k] for r in c]
        return peak_demand(pool, model, shape, slo_ms, weights=weights * k)[0] > gpus + 1e-9

    if exceeds(1):
        return 1
    fewer = last_true(lambda k: not exceeds(k), 1, MAX_COPIES)
    if fewer == MAX_COPIES:
        raise TraceTooSmall(
            f"the trace is too small for {gpus} GPUs of {shape!r} in {span_s:g} s even with "
            f"{MAX_COPIES} overlaid copies")
    return fewer + 1


def fit_in_span(records: Sequence[SessionRecord], model, shape: str, gpus: int, span_s: float,
                slo_ms: float | None = None, seed: int = 0,
                jitter_s: float = DEFAULT_COPY_JITTER_S) -> tuple[list[SessionRecord], SpanFit]:
    if gpus < 1:
        raise ValueError(f"--fit-gpus must be >= 1, got {gpus}")
    if span_s <= 0:
        raise ValueError(f"the span must be > 0 s, got {span_s}")
    if jitter_s < 0:
        raise ValueError(f"the copies' jitter must be >= 0 s, got {jitter_s}")
    if not records:
        raise ValueError("cannot fit an empty trace")
    last = max(r.arrival_s for r in records)
    if last <= 0:
        raise ValueError("every session arrives at time 0: the trace has no time axis to keep")
    factor = span_s / last
    base = [replace(r, arrival_s=round(r.arrival_s * factor, 6)) for r in records]
    weights = session_weights(base, model, shape, slo_ms)
    if max(weights) > 1.0 + 1e-9:
        raise ValueError(f"one session of {shape!r} needs more than one GPU")
    copies = _copies_needed(base, weights, model, shape, gpus, span_s, slo_ms, seed, jitter_s)
    # the copies drawn again from the seed, so the thinning's draws follow the same stream
    rng = np.random.default_rng(seed)
    pool = list(base) + [r for j in range(1, copies) for r in _copy(base, j, span_s, jitter_s, rng)]
    pool_w = list(weights) * copies
    order = np.argsort(rng.random(len(pool)), kind="stable")

    def peak_of(m: int) -> float:
        idx = order[:m]
        return peak_demand([pool[i] for i in idx], model, shape, slo_ms, weights=[pool_w[i] for i in idx])[0]

    # one session needs at most one GPU, so the first always fits; the whole pool does not
    lo = last_true(lambda m: peak_of(m) <= gpus + 1e-9, 1, len(pool) - 1)
    kept = sorted((pool[i] for i in order[:lo]), key=lambda r: (r.arrival_s, r.id))
    fit = SpanFit(time_factor=factor, copies=copies, kept=lo, offered=len(pool), peak_gpus=peak_of(lo))
    return kept, fit
