"""Detect: the workers' state, demand in GPUs, and its recent volatility.

In: a `ClusterView` and a `ModelCache`. Out: a `ClusterScan` (workers by state, bottleneck
and lightest ready load, largest free memory, active session count and demand) and a
`DemandWindow` (demand samples kept in the policy's memory, their standard deviation).

Demand is the number of GPUs the active and pending sessions need with perfect packing:
sum over sessions of 1 / capacity(shape, SLO, steps). Active sessions are counted from the
workers' coalescing groups (batch per CompatKey), never by iterating sessions, and kept per
worker across calls (`worker_index`: redone only for workers whose record changed), so a
scan costs O(changed workers x log workers + pending) beyond one C-level pass comparing
records. A shape whose single session misses the SLO (capacity 0) counts a
whole GPU per session: no packing can do better.

Held: idle sessions kept on their GPU because a restore from host memory could not meet
the SLO (`offload.resume_meets_slo`; wan14b-480p) are counted apart, as if active
(`ClusterScan.held_gpus`): their GPU is taken, and evicting them for a new session makes
their first chunk back late.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from operator import itemgetter

from ..types import CompatKey, WorkerId
from .offload import resume_meets_slo
from .views import ClusterView, SessionView
from .whatif import ModelCache
from .worker_index import WorkerIndex


def key_slo_ms(view: ClusterView, cache: ModelCache, key: CompatKey) -> float:
    """The per-chunk SLO of a coalescing group: the configured one, else the chunk's
    playback time at the shape's frame rate (CompatKey carries frames, not fps)."""
    if view.config.slo.slo_ms:
        return view.config.slo.slo_ms
    fps = cache.shape(key.model).fps
    frames = key.frames_per_chunk or cache.shape(key.model).video_frames_per_chunk
    return 1000.0 * frames / fps


def gpus_per_session(view: ClusterView, cache: ModelCache, key: CompatKey,
                     slo_ms: float | None = None) -> float:
    """Share of one GPU a session of this group needs at the SLO, with perfect packing."""
    slo = slo_ms if slo_ms is not None else key_slo_ms(view, cache, key)
    cap = cache.capacity(key.model, slo, key.steps)
    return 1.0 / cap if cap > 0 else 1.0


@dataclass
class ClusterScan:
    """Everything a decision needs from one pass over the workers."""

    ready: list[WorkerId] = field(default_factory=list)  # provisioning order
    starting: list[WorkerId] = field(default_factory=list)
    draining: list[WorkerId] = field(default_factory=list)
    max_load_ms: float = 0.0  # the bottleneck's predicted cycle
    min_ready_load_ms: float = math.inf  # the lightest READY worker's predicted cycle
    active_sessions: int = 0  # active sessions resident on workers (from their groups)
    pending_sessions: int = 0
    demand_gpus: float = 0.0  # active + pending sessions' GPUs with perfect packing
    # GPUs workers holding several coalescing groups need beyond their sessions' shares
    # (one round per group: the packing is not perfect there); 0 where each holds one group
    mixed_gpus: float = 0.0
    # idle sessions kept on their GPU (no restore meets the SLO), as if active; with count_held
    held_gpus: float = 0.0
    # the per-worker index the scan was read from (refreshed for this view): its load order
    index: WorkerIndex | None = field(default=None, repr=False, compare=False)

    @property
    def provisioned(self) -> int:
        """Workers in (or coming into) service: READY and STARTING, not DRAINING."""
        return len(self.ready) + len(self.starting)

    @property
    def session_gpus(self) -> float:
        """Mean GPUs per active or pending session (0 with none)."""
        n = self.active_sessions + self.pending_sessions
        return self.demand_gpus / n if n else 0.0

    @property
    def total(self) -> int:
        """Every billed worker, draining ones included."""
        return len(self.ready) + len(self.starting) + len(self.draining)


def worker_index(view: ClusterView, cache: ModelCache, share: dict[CompatKey, float] | None = None) -> WorkerIndex:
    """The cache's `WorkerIndex` for this view's SLO setting (it changes every share),
    brought up to date with the view: redone only for workers whose record changed.
    `share`: CompatKey -> GPUs per session, filled as met."""
    memo: dict[CompatKey, float] = {} if share is None else share

    def share_of(key: CompatKey) -> float:
        s = memo.get(key)
        if s is None:
            s = memo[key] = gpus_per_session(view, cache, key)
        return s

    index = cache.worker_index(view.config.slo.slo_ms)
    index.refresh(view, share_of, lambda key: key_slo_ms(view, cache, key))
    return index


def scan_cluster(view: ClusterView, cache: ModelCache, *, count_held: bool = False) -> ClusterScan:
    """`count_held`: also sum `held_gpus` (a pass over the idle GPU-resident sessions, which
    only TurboServe's autoscaler reads; 0 otherwise)."""
    share: dict[CompatKey, float] = {}
    index = worker_index(view, cache, share)
    scan = ClusterScan(ready=list(index.ready), starting=list(index.starting), draining=list(index.draining),
                       index=index)
    demand = sum(index.demand)
    active = sum(index.active)
    scan.mixed_gpus = sum(index.mixed)
    max_load = index.max_load_ms()
    min_ready = index.min_ready_load_ms()
    sessions = view.sessions
    for sid in view.pending:
        sv = sessions.get(sid)
        if sv is None:
            continue
        demand += _session_share(view, cache, share, sv)
        scan.pending_sessions += 1
    if count_held and view.idle_resident:
        scan.held_gpus = _held_gpus(view, cache, share)
    scan.max_load_ms = max_load
    scan.min_ready_load_ms = min_ready
    scan.active_sessions = active
    scan.demand_gpus = demand
    return scan


def _held_gpus(view: ClusterView, cache: ModelCache, share: dict[CompatKey, float]) -> float:
    """GPUs of the idle GPU-resident sessions whose restore could not meet the SLO. Where
    every kind of session present can be restored in time (demo91, wan1.3b), that is 0
    without a pass over the idle sessions."""
    kinds = view.slo_groups
    if kinds is not None and all(resume_meets_slo(view, cache, key, slo) for key, slo in kinds):
        return 0.0
    held = 0.0
    sessions = view.sessions
    for sid in view.idle_resident:
        sv = sessions.get(sid)
        if sv is not None and not resume_meets_slo(view, cache, sv.spec.compat_key, view.slo_ms(sv.spec)):
            held += _session_share(view, cache, share, sv)
    return held


def _session_share(view: ClusterView, cache: ModelCache, share: dict[CompatKey, float],
                   sv: SessionView) -> float:
    """A session's GPUs at its SLO (`gpus_per_session`), memoised per CompatKey in `share`."""
    key = sv.spec.compat_key
    s = share.get(key)
    if s is None:
        s = share[key] = gpus_per_session(view, cache, key, view.slo_ms(sv.spec))
    return s


@dataclass(frozen=True)
class DemandWindow:
    """Demand samples over the last `volatility_window_s`, at most one per `sample_s`
    (plenty for a standard deviation, and cheap to copy into new memory)."""

    samples: tuple[tuple[float, float], ...] = ()  # (time_s, demand in GPUs), oldest first
    std: float = 0.0  # standard deviation of the samples' demand (population)

    def observe(self, now_s: float, demand: float, window_s: float) -> "DemandWindow":
        """Memory after seeing `demand` at `now_s`. Unchanged (same object) when a sample
        was taken less than `sample_s` ago and nothing fell out of the window."""
        sample_s = max(window_s / 60.0, 1e-3)
        if self.samples and now_s - self.samples[-1][0] < sample_s:
            return self
        samples = self.samples + ((now_s, demand),)
        cutoff = now_s - window_s
        start = 0
        while start < len(samples) - 1 and samples[start][0] < cutoff:
            start += 1
        samples = samples[start:]
        return replace(self, samples=samples, std=_std([d for _, d in samples]))


    def rise_per_s(self, now_s: float, demand: float, span_s: float, z: float = 0.0) -> float:
        """Least-squares slope (GPUs per second) of demand over the last `span_s`,
        the current value included, less `z` standard errors of that slope, scaled down
        while the samples cover less than the span; 0 when falling or with too few samples.
        The discount keeps a lone arrival (a step of one session's share) from being read
        as a ramp: demand is a step function of sessions, and a slope fitted to one step
        near the end of the window is large but has a large standard error too."""
        samples = self.samples
        # oldest first: the span is a suffix (decisions come many times a second, so no scan)
        first = bisect.bisect_left(samples, now_s - span_s, key=itemgetter(0))
        pts = [p for p in samples[first:] if p[0] < now_s]
        pts.append((now_s, demand))
        if len(pts) < 3:
            return 0.0
        n = len(pts)
        # plain loops, not generator sums: this runs on every decision (same additions,
        # same order, so the same floats)
        st = sd = 0
        for t, d in pts:
            st += t
            sd += d
        mt = st / n
        md = sd / n
        var = cov = 0
        for t, d in pts:
            var += (t - mt) ** 2
            cov += (t - mt) * (d - md)
        if var <= 0.0:
            return 0.0
        slope = cov / var
        if z > 0.0 and slope > 0.0:
            resid = 0
            for t, d in pts:
                resid += (d - md - slope * (t - mt)) ** 2
            slope -= z * math.sqrt(resid / max(n - 2, 1) / var)
        slope = max(0.0, slope)
        # Trust a slope in proportion to the history it was fitted to: a few seconds of
        # samples (just after a start) would otherwise be projected over the whole span.
        covered_s = now_s - pts[0][0]
        return slope * min(1.0, covered_s / max(span_s, 1e-9))


def _std(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(max(0.0, sum((v - mean) ** 2 for v in values) / n))

