"""TurboServe's closed loop as one pure policy, and its ablations.

In: a `ClusterView` and the policy's memory (`TurboMemory`) from the previous call.
Out: a `Decision` with placements, offloads, migrations and scaling, and the new memory.

Per call, in the order of DESIGN.md "The closed loop":
1. Detect: one pass over the workers (`demand.scan_cluster`): demand in GPUs, bottleneck
   and lightest loads; a demand sample enters the volatility window.
2. Place: pending sessions by min-max over a what-if of loads (`placement.MinMaxChooser`).
3. Offload: idle sessions past their grace period; at once where a pending session found
   no room (`offload`).
4. Rebalance: drain DRAINING workers (consolidation), regroup workers holding several
   coalescing groups (`regroup`: one group leaves whole), then min-max moves off the
   bottleneck (`rebalance`); in-flight migrations count at their destination.
5. Scale: volatility-aware target, scale out at once, scale in after a hold (`autoscale`).
6. Prefetch: with nobody waiting for a GPU, idle sessions evicted under pressure whose
   restore could not meet the SLO go back to free GPUs before they resume (`offload`).
Each step is skipped by a cheap test when it has nothing to do, so the common call costs
one pass over the workers. Ablations switch off one mechanism each: `migration=False`
(no rebalancing or draining; scale-in only releases empty workers), `autoscale=False`
(fixed `cluster.gpus`), `offload=False`. The config's `enabled` flags switch the same
mechanisms off too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..config import TurboConfig
from ..types import SessionId
from .autoscale import ScaleTimers, lookahead_rise, turboserve_scale
from .demand import DemandWindow, scan_cluster, worker_index
from .offload import grace_offloads, held_prefetches, pressure_offloads, prune_offloading
from .placement import MinMaxChooser, place_pending
from .regroup import regroup_moves
from .rebalance import (InFlight, apply_in_flight, drain_moves, in_flight_record, prune_in_flight,
                        rebalance_min_max)
from .views import ClusterView, Decision, Migration, Placement
from .whatif import LoadOrder, ModelCache, WhatIf, cache_for
from .worker_index import WorkerIndex


@dataclass(frozen=True)
class TurboMemory:
    cache: ModelCache | None = field(default=None, compare=False)  # memo only, never state
    demand: DemandWindow = field(default_factory=DemandWindow)
    timers: ScaleTimers = field(default_factory=ScaleTimers)
    in_flight: tuple[InFlight, ...] = ()  # migrations issued and not yet finished
    offloading: frozenset[SessionId] = frozenset()  # offloads issued and not yet finished


def initial_autoscaled_gpus(config: TurboConfig) -> int:
    c, a = config.cluster, config.autoscale
    n = a.initial_gpus or c.min_gpus
    return max(min(max(c.min_gpus, 0), c.gpus), min(c.gpus, n))


class LazyOrder:
    """Builds the `LoadOrder` of all workers on first use (many calls never need it)."""

    def __init__(self, view: ClusterView, whatif: WhatIf, index: WorkerIndex | None = None):
        """`index`: the cache's `WorkerIndex` already refreshed for `view` (by a scan);
        None = refresh it here."""
        self._view, self._whatif, self._index, self._order = view, whatif, index, None

    def __call__(self) -> LoadOrder:
        if self._order is None:
            index = self._index or worker_index(self._view, self._whatif.cache)
            self._order = LoadOrder.of_index(self._whatif, index)
        return self._order


class TurboServePolicy:
    reads_round_phase = True  # placement weighs the wait for a worker's next round

    def __init__(self, name: str = "turboserve", *, migration: bool = True, autoscale: bool = True,
                 offload: bool = True):
        self.name = name
        self.migration = migration
        self.autoscale = autoscale
        self.offload = offload

    def __repr__(self) -> str:
        return f"TurboServePolicy({self.name!r})"

    def initial_gpus(self, config: TurboConfig) -> int:
        if self.autoscale and config.autoscale.enabled:
            return initial_autoscaled_gpus(config)
        return config.cluster.gpus

    def initial_memory(self) -> Any:
        return TurboMemory()

    def decide(self, view: ClusterView, memory: Any) -> Decision:
        mem = memory if isinstance(memory, TurboMemory) else TurboMemory()
        cfg = view.config
        use_autoscale = self.autoscale and cfg.autoscale.enabled
        use_offload = self.offload and cfg.offload.enabled
        use_migration = self.migration

        cache = cache_for(view, mem.cache)
        in_flight = prune_in_flight(view, mem.in_flight)
        offloading = prune_offloading(view, mem.offloading)
        scan = scan_cluster(view, cache, count_held=use_autoscale and cfg.autoscale.count_held_idle)
        demand = mem.demand.observe(view.now_s, scan.demand_gpus, cfg.autoscale.volatility_window_s) \
            if use_autoscale else mem.demand
        whatif = WhatIf(view, cache)
        apply_in_flight(view, whatif, in_flight)
        order = LazyOrder(view, whatif, scan.index)
        ready = set(scan.ready)
        busy: set[SessionId] = {m.session_id for m in in_flight} | offloading
        notes: list[str] = []

        # 2. place
        placements, unplaced = [], list(view.pending)
        if view.pending and ready:
            chooser = MinMaxChooser(whatif, order(), ready, cfg.placement.memory_headroom,
                                    cfg.placement.candidate_workers)
            placements, unplaced = place_pending(view, whatif, chooser)

        # 3. offload
        offloads: list[SessionId] = []
        starved = bool(unplaced)
        if use_offload:
            offloads = grace_offloads(view, offloading, whatif.cache)
            if unplaced:
                coming = offloading | frozenset(offloads)
                extra, hopeless = pressure_offloads(view, whatif, ready, unplaced, coming)
                offloads.extend(extra)
                starved = bool(hopeless)
            busy.update(offloads)

        # 4. rebalance
        migrations: list[Migration] = []
        budget = cfg.rebalance.max_moves_per_decision
        if use_migration and scan.draining:
            moves, drained = drain_moves(view, whatif, order(), ready, scan.draining, busy, budget,
                                         offload_idle=use_offload, offloading=offloading)
            migrations.extend(moves)
            offloads.extend(s for s in drained if s not in offloading)
        regrouped: list[Migration] = []  # beside the budget: see `rebalance.regroup_max_sessions`
        if use_migration and cfg.rebalance.enabled and cfg.rebalance.regroup_max_sessions and len(ready) > 1:
            several = scan.index.holding_several() if scan.index is not None else []
            if several or placements:
                candidates = several + [p.worker_id for p in placements]
                regrouped = regroup_moves(view, whatif, order(), ready, candidates, busy, offloading)
        if use_migration and cfg.rebalance.enabled and len(migrations) < budget and len(ready) > 1:
            spread = scan.max_load_ms - scan.min_ready_load_ms
            if placements or in_flight or regrouped or spread > cfg.rebalance.gain_threshold_ms:
                migrations.extend(rebalance_min_max(view, whatif, order(), ready, busy,
                                                    budget - len(migrations), offloading))
        migrations[:0] = regrouped

        # 5. scale
        timers = mem.timers
        scale_out, release, cancel = 0, (), ()
        if use_autoscale:
            protected = {p.worker_id for p in placements} | {m.dst for m in migrations}
            rise = lookahead_rise(cfg.autoscale, demand, view.now_s, scan.demand_gpus, scan.session_gpus)
            step, timers = turboserve_scale(view, scan, order, demand.std, mem.timers, starved=starved,
                                            protected=protected, consolidate=use_migration,
                                            rise_per_s=rise)
            scale_out, release, cancel = step.scale_out, step.release, step.cancel_release
            if step.note and (scale_out or release or cancel):
                notes.append(step.note)

        # 6. prefetch
        prefetches: list[Placement] = []
        if use_offload and cfg.offload.prefetch_held > 0 and not unplaced and view.idle_offloaded:
            prefetches = held_prefetches(view, whatif, order, ready, set(release),
                                         cfg.offload.prefetch_keep_free, cfg.offload.prefetch_held)

        if migrations:
            in_flight = in_flight + tuple(in_flight_record(view, m) for m in migrations)
        if offloads:
            offloading = offloading | frozenset(offloads)
        new_mem = mem
        if (cache is not mem.cache or demand is not mem.demand or timers != mem.timers
                or in_flight is not mem.in_flight or offloading is not mem.offloading):
            new_mem = replace(mem, cache=cache, demand=demand, timers=timers, in_flight=in_flight,
                              offloading=offloading)
        return Decision(placements=tuple(placements), migrations=tuple(migrations),
                        offloads=tuple(offloads), prefetches=tuple(prefetches), scale_out=scale_out,
                        release=tuple(release), cancel_release=tuple(cancel), memory=new_mem,
                        notes=tuple(notes))

