"""The baselines of DESIGN.md, defined exactly as there so that none is tuned weak.

In: a `ClusterView` and the baseline's memory. Out: a `Decision`. None of them offloads
(the open-source servers they stand for keep idle sessions resident, so a resumed session
simply continues on its GPU).
- `static-rr`: `cluster.gpus` fixed workers; each arriving session to the next worker in
  round-robin order that has room. No migration, no scaling.
- `static-ll`: fixed workers; each arriving session to the least-loaded worker with room.
- `autoscale-only`: Ray Serve's autoscaling (`autoscale.ray_serve_scale`), least-loaded
  at arrival, no migration; a released worker takes no new session and goes once empty.
- `migrate-only`: fixed workers, least-loaded at arrival, Llumnix-style pairwise balancing
  (`rebalance.pairwise_balance`) every `rebalance.poll_interval_s`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..config import TurboConfig
from ..types import WorkerId, WorkerState
from .autoscale import ScaleTimers, ray_serve_scale
from .demand import scan_cluster
from .placement import LeastLoadedChooser, RoundRobinChooser, place_pending
from .rebalance import InFlight, apply_in_flight, in_flight_record, pairwise_balance, prune_in_flight
from .turboserve import LazyOrder, initial_autoscaled_gpus
from .views import ClusterView, Decision
from .whatif import ModelCache, WhatIf, cache_for


def _ready(view: ClusterView) -> tuple[list[WorkerId], set[WorkerId]]:
    workers = list(view.workers)
    return workers, {w for w, v in view.workers.items() if v.state is WorkerState.READY}


@dataclass(frozen=True)
class StaticMemory:
    cache: ModelCache | None = field(default=None, compare=False)
    cursor: int = 0  # round-robin: index (provisioning order) where the next search starts


class StaticPolicy:
    """A fixed number of workers and a placement rule at arrival; nothing else."""

    reads_round_phase = False  # placement by load (or turn) only

    def __init__(self, name: str, rule: str):
        if rule not in ("round-robin", "least-loaded"):
            raise ValueError(f"placement rule must be 'round-robin' or 'least-loaded', got {rule!r}")
        self.name = name
        self.rule = rule

    def __repr__(self) -> str:
        return f"StaticPolicy({self.name!r})"

    def initial_gpus(self, config: TurboConfig) -> int:
        return config.cluster.gpus

    def initial_memory(self) -> Any:
        return StaticMemory()

    def decide(self, view: ClusterView, memory: Any) -> Decision:
        mem = memory if isinstance(memory, StaticMemory) else StaticMemory()
        if not view.pending:
            return Decision(memory=mem)  # fast path: nothing arrives, nothing else to do
        cache = cache_for(view, mem.cache)
        whatif = WhatIf(view, cache)
        workers, ready = _ready(view)
        headroom = view.config.placement.memory_headroom
        if self.rule == "round-robin":
            chooser = RoundRobinChooser(whatif, workers, ready, headroom, mem.cursor)
            placements, _ = place_pending(view, whatif, chooser)
            cursor = chooser.cursor
        else:
            chooser = LeastLoadedChooser(whatif, LazyOrder(view, whatif)(), ready, headroom)
            placements, _ = place_pending(view, whatif, chooser)
            cursor = mem.cursor
        unchanged = cache is mem.cache and cursor == mem.cursor
        new_mem = mem if unchanged else replace(mem, cache=cache, cursor=cursor)
        return Decision(placements=tuple(placements), memory=new_mem)


@dataclass(frozen=True)
class AutoscaleMemory:
    cache: ModelCache | None = field(default=None, compare=False)
    timers: ScaleTimers = field(default_factory=ScaleTimers)


class AutoscaleOnlyPolicy:
    """Ray Serve's replica autoscaling over sessions, least-loaded placement."""

    name = "autoscale-only"
    reads_round_phase = False

    def __repr__(self) -> str:
        return "AutoscaleOnlyPolicy()"

    def initial_gpus(self, config: TurboConfig) -> int:
        return initial_autoscaled_gpus(config)

    def initial_memory(self) -> Any:
        return AutoscaleMemory()

    def decide(self, view: ClusterView, memory: Any) -> Decision:
        mem = memory if isinstance(memory, AutoscaleMemory) else AutoscaleMemory()
        cache = cache_for(view, mem.cache)
        scan = scan_cluster(view, cache)
        whatif = WhatIf(view, cache)
        order = LazyOrder(view, whatif, scan.index)
        ready = set(scan.ready)
        placements = []
        if view.pending and ready:
            chooser = LeastLoadedChooser(whatif, order(), ready, view.config.placement.memory_headroom)
            placements, _ = place_pending(view, whatif, chooser)
        step, timers = ray_serve_scale(view, scan, order, mem.timers,
                                       protected={p.worker_id for p in placements})
        unchanged = cache is mem.cache and timers == mem.timers
        new_mem = mem if unchanged else replace(mem, cache=cache, timers=timers)
        return Decision(placements=tuple(placements), scale_out=step.scale_out, release=step.release,
                        cancel_release=step.cancel_release, memory=new_mem,
                        notes=(step.note,) if step.note else ())


@dataclass(frozen=True)
class MigrateOnlyMemory:
    cache: ModelCache | None = field(default=None, compare=False)
    last_poll_s: float = float("-inf")
    in_flight: tuple[InFlight, ...] = ()


class MigrateOnlyPolicy:
    """Fixed workers, least-loaded placement, Llumnix-style pairwise migration on a poll."""

    name = "migrate-only"
    reads_round_phase = False

    def __repr__(self) -> str:
        return "MigrateOnlyPolicy()"

    def initial_gpus(self, config: TurboConfig) -> int:
        return config.cluster.gpus

    def initial_memory(self) -> Any:
        return MigrateOnlyMemory()

    def decide(self, view: ClusterView, memory: Any) -> Decision:
        mem = memory if isinstance(memory, MigrateOnlyMemory) else MigrateOnlyMemory()
        poll = view.now_s - mem.last_poll_s >= view.config.rebalance.poll_interval_s
        if not view.pending and not poll:
            return Decision(memory=mem)
        cache = cache_for(view, mem.cache)
        in_flight = prune_in_flight(view, mem.in_flight)
        whatif = WhatIf(view, cache)
        apply_in_flight(view, whatif, in_flight)
        order = LazyOrder(view, whatif)
        workers, ready = _ready(view)
        placements = []
        if view.pending and ready:
            chooser = LeastLoadedChooser(whatif, order(), ready, view.config.placement.memory_headroom)
            placements, _ = place_pending(view, whatif, chooser)
        migrations = []
        last_poll = mem.last_poll_s
        if poll:
            last_poll = view.now_s
            if view.config.rebalance.enabled and len(ready) > 1:
                busy = {m.session_id for m in in_flight}
                migrations = pairwise_balance(view, whatif, order(), ready, busy,
                                              view.config.rebalance.max_moves_per_decision)
                in_flight = in_flight + tuple(in_flight_record(view, m) for m in migrations)
        new_mem = replace(mem, cache=cache, last_poll_s=last_poll, in_flight=in_flight)
        return Decision(placements=tuple(placements), migrations=tuple(migrations), memory=new_mem)
