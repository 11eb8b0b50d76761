"""Oracle bounds: what no policy can beat on a trace.

In: the trace's sessions (`SessionRecord`s, already mapped to the simulated shape), the
latency model, the SLO and the GPU memory. Out:
- `cost_lower_bound_gpu_hours`: the integral over time of the fewest GPUs that could hold
  the active load within the SLO with perfect packing and zero start-up delay;
- `latency_lower_bound_ms`: for a given ready-GPU count over time, the per-chunk latency
  of a perfectly balanced cluster (active sessions spread evenly over the ready GPUs),
  maximised over time.

Both use the trace's *nominal* schedule (as `traces.rescale` does): a period of n chunks
is active for n chunks of playback time (of the SLO, where an explicit SLO is longer),
then idle for its `idle_s`: the demand of sessions whose every chunk comes in real time.
It does not depend on any policy's choices, so one bound serves every run of a trace.

Caveat: the engine makes a session's next chunk due as soon as the previous one is
delivered, so a session served faster than real time finishes its period early and idles
until its viewer catches up: its GPUs see less concurrency than the nominal active load.
The two bounds above are therefore exact for real-time-paced serving, not strict for such
runs (a run may show a worst case below `latency_lb_ms`). `throughput_lower_bound_gpu_hours`
(every chunk at the best chunks-per-GPU-second within the SLO, no time structure) is
strict under either pacing, and looser; so is `latency_floor_ms`, the slowest of the
sessions' last chunks run alone (batch 1): no placement makes a chunk faster than its
round alone, so no run's worst chunk is below it (for a profile without jitter draws).
Where a policy's worst chunk sits on the floor, no policy can improve on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..policy.latency import LatencyModel
from ..policy.load import GroupLoad, cycle_ms
from ..types import CompatKey, SessionRecord

# Evaluating the mean context exactly costs O(active sessions) per instant; the latency
# bound is evaluated at the instants whose per-GPU batch is within one of the peak.
_MAX_CANDIDATE_INSTANTS = 512


@dataclass
class ShapeDemand:
    """Nominal active intervals of one compatibility group."""

    key: CompatKey
    starts_s: np.ndarray  # sorted by start
    ends_s: np.ndarray  # aligned with starts_s
    chunks_before: np.ndarray  # chunks the session generated before this interval
    chunk_period_s: float  # nominal time per chunk (the deadline)

    def active_at(self, times_s: np.ndarray) -> np.ndarray:
        starts = self.starts_s
        ends = np.sort(self.ends_s)
        return (np.searchsorted(starts, times_s, side="right")
                - np.searchsorted(ends, times_s, side="right")).astype(np.int64)


def nominal_demand(records: list[SessionRecord],
                   slo_ms_of: dict[CompatKey, float] | None = None) -> dict[CompatKey, ShapeDemand]:
    """Active intervals per compatibility group, on the nominal schedule: each chunk takes
    its playback time, or its group's SLO where that is longer (`traces.rescale.slo_pace`)."""
    raw: dict[CompatKey, tuple[list, list, list, float]] = {}
    for rec in records:
        key = rec.spec.compat_key
        period_s = rec.spec.chunk_seconds
        if slo_ms_of is not None and key in slo_ms_of:
            period_s = max(period_s, slo_ms_of[key] / 1000.0)
        starts, ends, before, _ = raw.setdefault(key, ([], [], [], period_s))
        t = rec.arrival_s
        done = 0
        for i, p in enumerate(rec.periods):
            n = rec.chunks_in_period(i)
            starts.append(t)
            ends.append(t + n * period_s)
            before.append(done)
            done += n
            t = t + n * period_s + p.idle_s
    out = {}
    for key, (starts, ends, before, period_s) in raw.items():
        s = np.asarray(starts, dtype=float)
        order = np.argsort(s, kind="stable")
        out[key] = ShapeDemand(key, s[order], np.asarray(ends, dtype=float)[order],
                               np.asarray(before, dtype=np.int64)[order], period_s)
    return out


def sessions_per_gpu(model: LatencyModel, key: CompatKey, slo_ms: float, gpu_memory_bytes: int) -> int:
    """Most active sessions of this group one GPU holds within the SLO (compute and memory)."""
    info = model.shape(key.model)
    by_compute = int(model.capacity(key.model, slo_ms, key.steps))
    full = model.state_bytes(key.model, info.window_frames)
    free = gpu_memory_bytes - info.weights_bytes
    by_memory = int(free // full) if full > 0 else by_compute
    return max(0, min(by_compute, by_memory))


def _change_points(demand: dict[CompatKey, ShapeDemand], extra: np.ndarray | None = None) -> np.ndarray:
    parts = [d.starts_s for d in demand.values()] + [d.ends_s for d in demand.values()]
    if extra is not None:
        parts.append(extra)
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0)


def cost_lower_bound_gpu_hours(demand: dict[CompatKey, ShapeDemand], model: LatencyModel,
                               slo_ms_of: dict[CompatKey, float], gpu_memory_bytes: int,
                               end_s: float | None = None) -> float:
    """Integral of ceil(sum over groups of active / per-GPU capacity) over time, in GPU-hours.
    Raises ValueError for a group one GPU cannot serve within its SLO (capacity 0)."""
    if not demand:
        return 0.0
    times = _change_points(demand)
    if end_s is not None:
        times = times[times <= end_s]
        times = np.append(times, end_s) if times.size == 0 or times[-1] < end_s else times
    gpus_frac = np.zeros(times.size)
    for key, d in demand.items():
        cap = sessions_per_gpu(model, key, slo_ms_of[key], gpu_memory_bytes)
        if cap <= 0:
            raise ValueError(f"shape {key.model!r}: one session cannot meet the {slo_ms_of[key]:.0f} ms SLO "
                             "on one GPU; no GPU count serves it (set a larger --slo-ms)")
        gpus_frac += d.active_at(times) / cap
    gpus = np.ceil(gpus_frac - 1e-9)
    widths = np.diff(times)
    return float((gpus[:-1] * widths).sum() / 3600.0)


def _context_table(model: LatencyModel, shape: str, max_chunks: int) -> np.ndarray:
    """context_after(shape, c) for c = 0..max_chunks; it saturates at the attention window,
    so the table stops growing once it has been flat for a while."""
    vals = []
    flat = 0
    for c in range(max_chunks + 1):
        v = float(model.context_after(shape, c))
        flat = flat + 1 if vals and v == vals[-1] else 0
        vals.append(v)
        if flat >= 64:
            break
    return np.asarray(vals)


def latency_lower_bound_ms(demand: dict[CompatKey, ShapeDemand], model: LatencyModel,
                           ready_times_s: np.ndarray, ready_gpus: np.ndarray, max_batch: int = 32,
                           end_s: float | None = None) -> float:
    """Max over time of the per-chunk latency a perfectly balanced cluster would give.

    `ready_times_s`/`ready_gpus` is a step function: `ready_gpus[i]` GPUs are ready from
    `ready_times_s[i]` on. Instants with no ready GPU are skipped (no placement exists).
    Several groups: the max over groups of each group's own balanced latency (a bound,
    since sharing GPUs with another group only adds time)."""
    if not demand:
        return 0.0
    ready_times_s = np.asarray(ready_times_s, dtype=float)
    ready_gpus = np.asarray(ready_gpus, dtype=float)
    times = _change_points(demand, ready_times_s)
    if end_s is not None:
        times = times[times <= end_s]
    if times.size == 0:
        return 0.0
    idx = np.searchsorted(ready_times_s, times, side="right") - 1
    ready = np.where(idx >= 0, ready_gpus[np.clip(idx, 0, None)], 0.0)
    best = 0.0
    for key, d in demand.items():
        active = d.active_at(times)
        ok = (ready > 0) & (active > 0)
        if not ok.any():
            continue
        per_gpu = np.zeros(times.size, dtype=np.int64)
        per_gpu[ok] = np.ceil(active[ok] / ready[ok] - 1e-9).astype(np.int64)
        peak = int(per_gpu.max())
        cand = np.nonzero(per_gpu >= max(1, peak - 1))[0]
        if cand.size > _MAX_CANDIDATE_INSTANTS:
            cand = cand[np.linspace(0, cand.size - 1, _MAX_CANDIDATE_INSTANTS).astype(int)]
        max_chunks = int(d.chunks_before.max() + (d.ends_s - d.starts_s).max() / d.chunk_period_s + 1)
        table = _context_table(model, key.model, max_chunks)
        for i in cand:
            t = times[i]
            live = (d.starts_s <= t) & (d.ends_s > t)
            done = d.chunks_before[live] + np.floor((t - d.starts_s[live]) / d.chunk_period_s).astype(np.int64)
            ctx = float(table[np.clip(done, 0, table.size - 1)].mean()) if done.size else 0.0
            b = int(per_gpu[i])
            best = max(best, cycle_ms([GroupLoad(key, b, b * ctx)], model, max_batch))
    return best


def latency_floor_ms(records: list[SessionRecord], model: LatencyModel, max_batch: int = 32) -> float:
    """The slowest last chunk of any session run alone: one batch-1 round at the context
    its last chunk sees, plus the per-chunk fixed cost. A strict lower bound of every
    run's worst chunk (contexts only grow, and a batch of one is the fastest round)."""
    best = 0.0
    seen: set[tuple[CompatKey, int]] = set()
    tables: dict[str, np.ndarray] = {}
    for rec in records:
        key = rec.spec.compat_key
        chunks = sum(rec.chunks_in_period(i) for i in range(len(rec.periods)))
        if chunks <= 0:
            continue
        table = tables.get(key.model)
        if table is None:
            table = tables[key.model] = _context_table(model, key.model, 100_000)
        done = min(chunks - 1, table.size - 1)  # chunks generated before the last one
        if (key, done) in seen:
            continue
        seen.add((key, done))
        best = max(best, cycle_ms([GroupLoad(key, 1, float(table[done]))], model, max_batch))
    return best


def demand_series(demand: dict[CompatKey, ShapeDemand], model: LatencyModel,
                  slo_ms_of: dict[CompatKey, float], gpu_memory_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(times_s, fractional GPUs of demand) step function, for plots."""
    times = _change_points(demand)
    frac = np.zeros(times.size)
    for key, d in demand.items():
        cap = sessions_per_gpu(model, key, slo_ms_of[key], gpu_memory_bytes)
        if cap > 0:
            frac += d.active_at(times) / cap
    return times, frac


def throughput_lower_bound_gpu_hours(records: list[SessionRecord], model: LatencyModel,
                                     slo_ms_of: dict[CompatKey, float], gpu_memory_bytes: int,
                                     max_batch: int = 32) -> float:
    """A schedule-free bound: total chunks / the best chunks per GPU-second within the SLO.
    Looser than the time-integral bound, kept as a cross-check."""
    chunks: dict[CompatKey, int] = {}
    for rec in records:
        key = rec.spec.compat_key
        chunks[key] = chunks.get(key, 0) + sum(rec.chunks_in_period(i) for i in range(len(rec.periods)))
    total_s = 0.0
    for key, n in chunks.items():
        cap = sessions_per_gpu(model, key, slo_ms_of[key], gpu_memory_bytes)
        if cap <= 0:
            return math.inf
        ctx0 = float(model.context_after(key.model, 0))
        best = max(b / (cycle_ms([GroupLoad(key, b, b * ctx0)], model, max_batch) / 1000.0)
                   for b in range(1, cap + 1))
        total_s += n / best
    return total_s / 3600.0
