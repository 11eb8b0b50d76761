"""Scale: how many GPUs to rent, and which to give back.

In: a `ClusterScan` (demand in GPUs, workers by state), a `LoadOrder` maker (built only
when workers are to be released), the autoscaler's timers from the policy's memory. Out: a
`ScaleStep` (workers to start, to release, draining workers to put back in service) and
the new timers.

TurboServe (`turboserve_scale`): target = ceil(demand / util + headroom_k * std + spare),
util being `target_util`, or the mean session's share of a GPU where that is more (a session
that fills its GPU leaves no share to plan free), demand counting the idle sessions held on
their GPU (`ClusterScan.held_gpus`, unless `count_held_idle` is off) and what workers
holding several coalescing groups need beyond perfect packing (`ClusterScan.mixed_gpus`:
one round per group there), std being the demand's standard deviation over
`volatility_window_s`, clamped to [min_gpus,
cluster.gpus], spare = max(`spare_gpus`, `spare_fraction` * cluster.gpus). With
`lookahead_s` > 0, demand is first extrapolated that far along its recent rise
(least-squares slope over the last `rise_window_s`, or `lookahead_s` when that is 0; never
down; trusted in proportion to the history it was fitted to; less `rise_min_sessions`
sessions' worth per window, so a couple of arrivals is no ramp), so a ramp gets its GPUs
one start-up delay early. The spare keeps capacity up for a burst out of a quiet spell,
which no forecast sees coming; it scales with the ceiling (the operator's bound on peak
demand), since a burst brings a share of the peak within one start-up delay. Demand counts
pending sessions; provisioned = READY + STARTING workers (the start-up pipeline already
counts). Above target: first cancel the release of draining workers (those still holding
the most sessions: nothing to rebuild), then start new ones at once. Below target: only
after the target has stayed below provisioned for `scale_in_hold_s`, release down to the
highest target seen during that hold (without the projected rise unless `hold_counts_rise`:
a forecast that did not come true holds nothing), least-loaded READY workers first
(STARTING ones before them: they hold nothing); with migration they drain by consolidation
(a session moves only where the destination stays within its SLO), without it only empty
workers are released.

Ray Serve (`ray_serve_scale`, the autoscale-only baseline): desired = ceil(ongoing sessions
/ target per GPU), where ongoing = active + pending sessions and the target is
`target_sessions_per_gpu`, or else `target_capacity_fraction` of the capacity at the SLO of
each session's shape (so a mix of shapes sums its per-session shares). Upscale to desired
once desired > current has held `upscale_delay_s`; downscale once desired < current has held
`downscale_delay_s`. Released workers take no new sessions and go once empty (Ray's graceful
drain); empty ones are released first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from typing import Callable

from ..config import AutoscaleConfig
from ..types import WorkerId, WorkerState
from .demand import ClusterScan, DemandWindow
from .views import ClusterView
from .whatif import LoadOrder


@dataclass(frozen=True)
class ScaleStep:
    scale_out: int = 0
    release: tuple[WorkerId, ...] = ()
    cancel_release: tuple[WorkerId, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class ScaleTimers:
    """When the target was first seen above / below the provisioned count (None = not)."""

    above_since_s: float | None = None
    below_since_s: float | None = None
    below_max_target: int = 0  # TurboServe: the highest target seen since `below_since_s`


def clamp_gpus(view: ClusterView, n: int) -> int:
    c = view.config.cluster
    lo = min(max(c.min_gpus, 0), c.gpus)
    return max(lo, min(c.gpus, n))


def lookahead_rise(a: AutoscaleConfig, demand: DemandWindow, now_s: float, current: float,
                   session_gpus: float = 0.0) -> float:
    """Demand's recent rise (GPUs per second) that `turboserve_target` projects
    `lookahead_s` ahead: the slope over the last `rise_window_s` (0 = `lookahead_s`), less
    `rise_min_sessions` sessions of `session_gpus` GPUs each per span (never below 0)."""
    if a.lookahead_s <= 0:
        return 0.0
    span = a.rise_window_s if a.rise_window_s > 0 else a.lookahead_s
    slope = demand.rise_per_s(now_s, current, span, a.rise_confidence_z)
    if slope > 0.0 and a.rise_min_sessions > 0.0:
        slope = max(0.0, slope - a.rise_min_sessions * session_gpus / span)
    return slope


def spare_gpus(view: ClusterView) -> float:
    """GPUs kept beyond the demand-driven target: `spare_gpus`, or `spare_fraction` of the
    ceiling where that is more (the burst reserve)."""
    a = view.config.autoscale
    return max(a.spare_gpus, a.spare_fraction * view.config.cluster.gpus)


def turboserve_target(view: ClusterView, scan: ClusterScan, std: float, rise_per_s: float = 0.0) -> int:
    a = view.config.autoscale
    demand = scan.demand_gpus + scan.held_gpus + scan.mixed_gpus + rise_per_s * a.lookahead_s
    # A GPU is planned to `target_util` of its capacity only where it holds several sessions:
    # where one session is a GPU's whole capacity (wan14b-480p), the rest is no room for
    # another, and a session never needs more than its GPU (the mean share is exact for
    # one shape, a blend for a mix)
    util = max(a.target_util, min(1.0, scan.session_gpus))
    raw = demand / max(util, 1e-6) + a.headroom_k * std + spare_gpus(view)
    return clamp_gpus(view, math.ceil(raw - 1e-9))


def _grow(view: ClusterView, scan: ClusterScan, want: int) -> tuple[int, tuple[WorkerId, ...]]:
    """Add `want` workers: cancel releases first (most sessions first), then start new ones
    within the ceiling `cluster.gpus` (draining workers are still billed, so they count)."""
    draining = sorted(scan.draining, key=lambda w: (-len(view.workers[w].sessions), w))
    cancel = tuple(draining[:want])
    want -= len(cancel)
    room = view.config.cluster.gpus - scan.total
    return max(0, min(want, room)), cancel


def _pick_release(view: ClusterView, order: LoadOrder, ready: set[WorkerId], count: int,
                  protected: set[WorkerId], empty_only: bool, empty_first: bool) -> tuple[WorkerId, ...]:
    """The `count` cheapest workers to give back: STARTING ones first (they hold nothing and
    go at once), then the least-loaded READY ones (fewest sessions among equal loads)."""
    cands = []
    for load, rank, wid in order.ascending():
        if wid in protected:
            continue
        if view.workers[wid].state is WorkerState.STARTING:
            cands.append((-1, 0.0, 0, rank, wid))
            continue
        if wid not in ready:
            continue
        w = view.workers[wid]
        n = len(w.sessions)
        if empty_only and n:
            continue
        cands.append(((0 if n == 0 else 1) if empty_first else 0, load, n, rank, wid))
    cands.sort()
    return tuple(c[-1] for c in cands[:count])


def turboserve_scale(view: ClusterView, scan: ClusterScan, order: Callable[[], LoadOrder], std: float,
                     timers: ScaleTimers, *, starved: bool, protected: set[WorkerId],
                     consolidate: bool, rise_per_s: float = 0.0) -> tuple[ScaleStep, ScaleTimers]:
    """`starved`: a pending session has no room anywhere even after offloads; with nothing
    starting, one more worker is started whatever the demand estimate says. `protected`:
    workers this decision placed or migrated onto (never released in the same breath)."""
    target = turboserve_target(view, scan, std, rise_per_s)
    prov = scan.provisioned
    if starved and not scan.starting:
        target = clamp_gpus(view, max(target, prov + 1))
    if target > prov:
        out, cancel = _grow(view, scan, target - prov)
        note = f"demand {scan.demand_gpus:.2f} std {std:.2f} -> target {target} (provisioned {prov})"
        return ScaleStep(scale_out=out, cancel_release=cancel, note=note), ScaleTimers()
    if target < prov:
        # The level released down to leaves out the projected rise (unless
        # `hold_counts_rise`): a forecast that did not come true is no demand to keep GPUs for.
        level = target
        if rise_per_s > 0.0 and not view.config.autoscale.hold_counts_rise:
            level = turboserve_target(view, scan, std)
        since = timers.below_since_s
        if since is None:
            return ScaleStep(), ScaleTimers(below_since_s=view.now_s, below_max_target=level)
        # Release down to the highest level of the hold, not the latest one: a burst
        # that came and went within the hold comes back as often as not.
        hold_target = max(level, timers.below_max_target)
        if hold_target != timers.below_max_target:
            timers = replace(timers, below_max_target=hold_target)
        if view.now_s - since < view.config.autoscale.scale_in_hold_s:
            return ScaleStep(), timers
        ready = set(scan.ready)
        release = _pick_release(view, order(), ready, prov - hold_target, protected,
                                empty_only=not consolidate, empty_first=True)
        if not release:
            return ScaleStep(), timers
        note = (f"demand {scan.demand_gpus:.2f} held below for {view.now_s - since:.0f}s "
                f"-> target {hold_target} (provisioned {prov})")
        return ScaleStep(release=release, note=note), ScaleTimers()
    return ScaleStep(), ScaleTimers()


def ray_serve_desired(view: ClusterView, scan: ClusterScan) -> int:
    per_gpu = view.config.autoscale.target_sessions_per_gpu
    ongoing = scan.active_sessions + scan.pending_sessions
    if per_gpu > 0:
        raw = ongoing / per_gpu
    else:
        # sum of 1 / capacity at the SLO over ongoing sessions, at the target share of it
        raw = scan.demand_gpus / max(view.config.autoscale.target_capacity_fraction, 1e-6)
    return clamp_gpus(view, math.ceil(raw - 1e-9))


def ray_serve_scale(view: ClusterView, scan: ClusterScan, order: Callable[[], LoadOrder],
                    timers: ScaleTimers, protected: set[WorkerId]) -> tuple[ScaleStep, ScaleTimers]:
    a = view.config.autoscale
    desired = ray_serve_desired(view, scan)
    current = scan.provisioned
    now = view.now_s
    if desired > current:
        since = timers.above_since_s if timers.above_since_s is not None else now
        if now - since >= a.upscale_delay_s:
            out, cancel = _grow(view, scan, desired - current)
            note = f"ongoing {scan.active_sessions + scan.pending_sessions} -> desired {desired}"
            return ScaleStep(scale_out=out, cancel_release=cancel, note=note), ScaleTimers()
        return ScaleStep(), ScaleTimers(above_since_s=since)
    if desired < current:
        since = timers.below_since_s if timers.below_since_s is not None else now
        if now - since >= a.downscale_delay_s:
            release = _pick_release(view, order(), set(scan.ready), current - desired, protected,
                                    empty_only=False, empty_first=True)
            if release:
                note = f"ongoing {scan.active_sessions + scan.pending_sessions} -> desired {desired}"
                return ScaleStep(release=release, note=note), ScaleTimers()
        return ScaleStep(), ScaleTimers(below_since_s=since)
    return ScaleStep(), ScaleTimers()

