"""`ProfileLatencyModel`: the `LatencyModel` of policy/latency.py over measured profiles.

In: `ShapeProfile`s (profile/format.py), any number, one per shape. Out: predicted round
latency (ms), per-session fixed cost (ms), state and activation bytes, context growth and
per-GPU capacity, for the scheduler, the engine's profiled executor and the simulator.

Round latency is a table over (batch, context) per shape:
- Measured launch jitter makes raw tables slightly non-monotone (the 91-token shape's round
  of 4 sessions is faster than of 2). A round with more work is never planned as faster, so
  the table is replaced by its upper envelope: running maximum along batch, then along
  context. Where the raw table is already monotone it is returned exactly at its points.
- Between points: bilinear interpolation. Beyond the largest batch: linear extrapolation
  with the slope of the last two batches (the slope never decreases with context, so the
  extrapolation stays monotone in context). Below the smallest batch: that batch's value.
  Context is clamped to the measured range: a profile measured up to the full window's
  steady state (cache of `window - chunk` frames plus the chunk) covers every context.
- `steps` denoising steps take `steps + 1` passes; the table was measured with
  `shape.passes`, so a round scales by `(steps + 1) / passes`.
- Missing cells of a sparse table are filled along batch from the same context's points
  (with a single point, cost proportional to the batch: the compute-bound assumption).

Every query is memoized (context rounded to a quarter latent frame) because the scheduler's
what-if loops ask the same few questions over and over.
"""

from __future__ import annotations

import bisect
from dataclasses import replace
from typing import Iterable

from ..policy.latency import ShapeInfo
from ..search import last_true
from .format import ShapeProfile

CONTEXT_QUANTUM = 4  # memo keys round context to 1/4 latent frame
MAX_CAPACITY = 1 << 20  # search bound for capacity()


class _ShapeTable:
    """Precomputed, monotone tables of one shape."""

    def __init__(self, p: ShapeProfile):
        self.profile = p
        self.info = p.shape
        self.contexts = sorted({r.context_frames for r in p.rounds})
        self.batches = sorted({r.batch for r in p.rounds})
        grid = [self._fill_row(c) for c in self.contexts]
        for row in grid:  # running max along batch
            for j in range(1, len(row)):
                row[j] = max(row[j], row[j - 1])
        for i in range(1, len(grid)):  # running max along context
            grid[i] = [max(a, b) for a, b in zip(grid[i], grid[i - 1])]
        self.grid = grid
        slopes = []
        for row in grid:
            if len(self.batches) >= 2:
                s = (row[-1] - row[-2]) / (self.batches[-1] - self.batches[-2])
            else:
                s = row[-1] / self.batches[-1]
            slopes.append(max(s, slopes[-1]) if slopes else s)
        self.slopes = slopes
        self.state_pts = sorted(p.state_bytes)
        act = sorted(p.activation_bytes)
        for j in range(1, len(act)):
            act[j] = (act[j][0], max(act[j][1], act[j - 1][1]))
        self.act_pts = act

    def _fill_row(self, context: float) -> list[float]:
        pts = sorted((r.batch, r.round_ms) for r in self.profile.rounds if r.context_frames == context)
        xs = [b for b, _ in pts]
        ys = [t for _, t in pts]
        row = []
        for b in self.batches:
            i = bisect.bisect_left(xs, b)
            if i < len(xs) and xs[i] == b:
                row.append(ys[i])
            elif len(xs) == 1:
                row.append(ys[0] * b / xs[0])
            else:
                row.append(_lerp_extrapolate(xs, ys, b))
        return row

    def row_value(self, i: int, batch: float) -> float:
        bs, row = self.batches, self.grid[i]
        if batch <= bs[0]:
            return row[0]
        if batch >= bs[-1]:
            return row[-1] + self.slopes[i] * (batch - bs[-1])
        j = bisect.bisect_right(bs, batch) - 1
        t = (batch - bs[j]) / (bs[j + 1] - bs[j])
        return row[j] + t * (row[j + 1] - row[j])

    def round_ms(self, batch: int, context: float) -> float:
        cs = self.contexts
        if context <= cs[0]:
            return self.row_value(0, batch)
        if context >= cs[-1]:
            return self.row_value(len(cs) - 1, batch)
        i = bisect.bisect_right(cs, context) - 1
        t = (context - cs[i]) / (cs[i + 1] - cs[i])
        a, b = self.row_value(i, batch), self.row_value(i + 1, batch)
        return a + t * (b - a)


def _lerp_extrapolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through the points, extended with the end slopes."""
    if len(xs) == 1:
        return ys[0]
    if x <= xs[0]:
        i = 0
    elif x >= xs[-1]:
        i = len(xs) - 2
    else:
        i = bisect.bisect_right(xs, x) - 1
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return ys[i] + t * (ys[i + 1] - ys[i])


class ProfileLatencyModel:
    """Implements `turboserve.policy.latency.LatencyModel` from measured profiles."""

    # round_ms never falls as batch or context grows (the tables are running maxima, and
    # interpolation and extrapolation keep that), and context_after never passes the
    # shape's window: policies may bound a change's effect without listing its sessions
    # (`policy.rebalance`)
    round_ms_monotone = True

    def __init__(self, profiles: Iterable[ShapeProfile] = ()):
        self._tables: dict[str, _ShapeTable] = {}
        self._round_memo: dict[tuple, float] = {}
        self._capacity_memo: dict[tuple, int] = {}
        for p in profiles:
            self.add_profile(p)

    # -- registry
    def add_profile(self, p: ShapeProfile) -> None:
        """Register (or replace) a shape. Clears the memo: answers may change."""
        if not p.rounds:
            raise ValueError(f"profile of shape {p.name!r} has no measured rounds")
        self._tables[p.name] = _ShapeTable(p)
        self._round_memo.clear()
        self._capacity_memo.clear()

    def shapes(self) -> list[str]:
        return sorted(self._tables)

    def on_gpu(self, memory_bytes: int) -> "ProfileLatencyModel":
        """This model on GPUs of `memory_bytes` (the simulated cluster's, where the profile
        was measured on another): the same tables, with every shape's `gpu_memory_bytes`
        set to it, so that capacity where memory binds follows the simulated GPU. Itself
        where every shape already has that memory."""
        if all(t.info.gpu_memory_bytes == memory_bytes for t in self._tables.values()):
            return self
        return ProfileLatencyModel(replace(t.profile, shape=replace(t.info, gpu_memory_bytes=memory_bytes))
                                   for t in self._tables.values())

    def has_shape(self, name: str) -> bool:
        return name in self._tables

    def profile(self, name: str) -> ShapeProfile:
        return self._table(name).profile

    def _table(self, name: str) -> _ShapeTable:
        t = self._tables.get(name)
        if t is None:
            raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(self.shapes()) or '(none)'}")
        return t

    # -- LatencyModel protocol
    def shape(self, name: str) -> ShapeInfo:
        return self._table(name).info

    def round_ms(self, shape: str, batch: int, context_frames: float, steps: int) -> float:
        key = (shape, batch, int(context_frames * CONTEXT_QUANTUM + 0.5), steps)
        v = self._round_memo.get(key)
        if v is None:
            v = self._round_uncached(*key)
            self._round_memo[key] = v
        return v

    def _round_uncached(self, shape: str, batch: int, q_context: int, steps: int) -> float:
        t = self._table(shape)
        if batch <= 0:
            return 0.0
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        return t.round_ms(batch, q_context / CONTEXT_QUANTUM) * (steps + 1) / t.info.passes

    def fixed_ms(self, shape: str) -> float:
        return self._table(shape).profile.fixed_ms

    def jitter(self, shape: str) -> tuple[float, ...]:
        """A round's time over `round_ms + batch * fixed_ms`, as quantiles; () = exact."""
        return tuple(self._table(shape).profile.jitter)

    def jitter_unit(self, shape: str) -> str:
        """How `jitter` applies: "ratio" (times the table's time) or "ms" (added to it)."""
        return self._table(shape).profile.jitter_unit

    def jitter_shared(self, shape: str) -> tuple[float, ...]:
        """`jitter` for rounds begun while another engine on the host is mid-round; () =
        no distinction (`jitter` for every round)."""
        return tuple(self._table(shape).profile.jitter_shared)

    def jitter_by_batch(self, shape: str) -> dict[int, tuple[float, ...]]:
        """batch -> the `jitter` of rounds of that size, where calibration timed enough of them."""
        return {b: tuple(q) for b, q in self._table(shape).profile.jitter_by_batch.items()}

    def jitter_shared_by_batch(self, shape: str) -> dict[int, tuple[float, ...]]:
        """batch -> the `jitter_shared` of rounds of that size."""
        return {b: tuple(q) for b, q in self._table(shape).profile.jitter_shared_by_batch.items()}

    @property
    def has_jitter(self) -> bool:
        return any(t.profile.jitter for t in self._tables.values())

    def state_bytes(self, shape: str, context_frames: float) -> int:
        t = self._table(shape)
        ctx = min(max(0.0, context_frames), float(t.info.window_frames))
        pts = t.state_pts
        if not pts:
            return 0
        if len(pts) == 1:
            c0, b0 = pts[0]
            return int(b0 * ctx / c0) if c0 > 0 else int(b0)
        return max(0, int(_lerp_extrapolate([c for c, _ in pts], [b for _, b in pts], ctx)))

    def activation_bytes(self, shape: str, batch: int) -> int:
        t = self._table(shape)
        pts = t.act_pts
        if batch <= 0 or not pts:
            return 0
        xs = [b for b, _ in pts]
        ys = [v for _, v in pts]
        if batch <= xs[0]:
            return int(ys[0])
        if len(pts) == 1:
            return int(ys[0] * batch / xs[0])
        return max(0, int(_lerp_extrapolate(xs, ys, batch)))

    def context_after(self, shape: str, chunks_done: int) -> int:
        info = self._table(shape).info
        return min(max(0, chunks_done) * info.latent_frames_per_chunk, info.window_frames)

    def capacity(self, shape: str, slo_ms: float, steps: int) -> int:
        """Largest batch b with round_ms(b, window) + b * fixed_ms <= slo_ms, and whose full
        window state fits in the profiled GPU's memory beside the weights and one round's
        activations. 0 when a single session misses."""
        key = (shape, slo_ms, steps)
        v = self._capacity_memo.get(key)
        if v is None:
            v = min(self._latency_capacity(shape, slo_ms, steps), self.memory_capacity(shape))
            self._capacity_memo[key] = v
        return v

    def _latency_capacity(self, shape: str, slo_ms: float, steps: int) -> int:
        t = self._table(shape)
        window = t.info.window_frames
        fixed = t.profile.fixed_ms
        return _largest(lambda b: self.round_ms(shape, b, window, steps) + b * fixed <= slo_ms)

    def memory_capacity(self, shape: str, context_frames: float | None = None) -> int:
        """Most sessions whose state (at `context_frames`, default the full window) fits on
        the profiled GPU beside the weights and one round's activations."""
        info = self._table(shape).info
        ctx = info.window_frames if context_frames is None else context_frames
        per = self.state_bytes(shape, ctx)
        free = info.gpu_memory_bytes - info.weights_bytes
        return _largest(lambda b: b * per + self.activation_bytes(shape, b) <= free)

    def transfer_gbps(self, shape: str) -> dict[str, float]:
        """Measured copy rates (GB/s) of the shape's profile; empty when not measured."""
        return dict(self._table(shape).profile.transfer)

    def chunk_ms(self, shape: str) -> float:
        return self._table(shape).info.chunk_ms


def _largest(ok) -> int:
    """Largest b >= 0 with ok(b), for a predicate true up to some point and false after."""
    return last_true(ok, 1, MAX_CAPACITY) if ok(1) else 0


__all__ = ["ProfileLatencyModel", "CONTEXT_QUANTUM"]
