"""Per-worker decision inputs kept across policy calls, redone only where a worker changed.

In: a `ClusterView`, a function giving a CompatKey's share of one GPU and (optionally) one
giving its SLO. Out: what one full pass over the workers would give, as a `WorkerIndex`:
each worker's demand in GPUs and active sessions (from its coalescing groups), what a
worker holding several groups needs beyond their shares (`mixed`: its predicted cycle
against the tightest of their SLOs, less the shares; each group runs its own round there),
the workers by state in provisioning order, and every worker sorted by (load,
provisioning order), the base of `LoadOrder`.

The controller replaces a worker's view record on every change, so a record that is the
same object as at the last call means that worker did not change. Comparing the records
runs in C (`map(operator.is_not, ...)`); only changed workers are redone, in O(log W)
each. A worker added or removed (scaling, rare) rebuilds the index. Totals are sums over
per-worker lists in provisioning order, bit-identical to the sequential pass they replace.
A `ModelCache` keeps one index per SLO setting (the shares depend on it); an index is a
memo, never state: rebuilding it from scratch gives the same values.
"""

from __future__ import annotations

import bisect
import math
from itertools import compress
from operator import is_not
from typing import Callable

from ..types import CompatKey, WorkerId, WorkerState
from .views import ClusterView, WorkerView

_IN_SERVICE = (WorkerState.READY, WorkerState.STARTING, WorkerState.DRAINING)


class WorkerIndex:
    def __init__(self) -> None:
        self.wids: list[WorkerId] = []  # provisioning order (the view's)
        self._recs: list[WorkerView] = []
        self.demand: list[float] = []  # per worker, GPUs its active sessions need (0 if out of service)
        self.active: list[int] = []  # per worker, active sessions (0 if out of service)
        self.mixed: list[float] = []  # per worker, GPUs beyond `demand` for holding several groups
        self.several: list[bool] = []  # per worker, whether it holds several groups
        self.by_load: list[tuple[float, int, WorkerId]] = []  # (load, provisioning index, worker), ascending
        self.entry: dict[WorkerId, tuple[float, int, WorkerId]] = {}
        self.ready: list[WorkerId] = []
        self.starting: list[WorkerId] = []
        self.draining: list[WorkerId] = []

    def refresh(self, view: ClusterView, share: Callable[[CompatKey], float],
                slo_of: Callable[[CompatKey], float] | None = None) -> None:
        workers = view.workers
        wids = list(workers)
        if wids != self.wids:
            self._rebuild(wids, list(workers.values()), share, slo_of)
            return
        recs = list(workers.values())
        old = self._recs
        changed = list(compress(range(len(recs)), map(is_not, recs, old)))
        if not changed:
            return
        self._recs = recs
        states_moved = False
        by_load, entry = self.by_load, self.entry
        for i in changed:
            w, was = recs[i], old[i]
            states_moved = states_moved or w.state is not was.state
            self.demand[i], self.active[i], self.mixed[i], self.several[i] = _worker_demand(w, share, slo_of)
            if w.load_ms != was.load_ms:
                wid = wids[i]
                del by_load[bisect.bisect_left(by_load, entry[wid])]
                e = entry[wid] = (w.load_ms, i, wid)
                bisect.insort(by_load, e)
        if states_moved:
            self._split_by_state()

    def holding_several(self) -> list[WorkerId]:
        """Workers holding several coalescing groups (none, at the cost of one C-level
        scan, on traces with one group)."""
        return list(compress(self.wids, self.several)) if any(self.several) else []

    def max_load_ms(self) -> float:
        """The heaviest in-service worker's load (0 if none): the bottleneck's cycle."""
        recs = self._recs
        for load, i, _ in reversed(self.by_load):
            if recs[i].state in _IN_SERVICE:
                return max(0.0, load)
        return 0.0

    def min_ready_load_ms(self) -> float:
        recs = self._recs
        for load, i, _ in self.by_load:
            if recs[i].state is WorkerState.READY:
                return load
        return math.inf

    def _rebuild(self, wids: list[WorkerId], recs: list[WorkerView], share: Callable[[CompatKey], float],
                 slo_of: Callable[[CompatKey], float] | None) -> None:
        self.wids, self._recs = wids, recs
        per = [_worker_demand(w, share, slo_of) for w in recs]
        self.demand = [d for d, _, _, _ in per]
        self.active = [a for _, a, _, _ in per]
        self.mixed = [m for _, _, m, _ in per]
        self.several = [x for _, _, _, x in per]
        self.entry = {wid: (w.load_ms, i, wid) for i, (wid, w) in enumerate(zip(wids, recs))}
        self.by_load = sorted(self.entry.values())
        self._split_by_state()

    def _split_by_state(self) -> None:
        self.ready, self.starting, self.draining = [], [], []
        lists = {WorkerState.READY: self.ready, WorkerState.STARTING: self.starting,
                 WorkerState.DRAINING: self.draining}
        for wid, w in zip(self.wids, self._recs):
            dest = lists.get(w.state)
            if dest is not None:
                dest.append(wid)


def _worker_demand(w: WorkerView, share: Callable[[CompatKey], float],
                   slo_of: Callable[[CompatKey], float] | None) -> tuple[float, int, float, bool]:
    """(GPUs, sessions, mixed GPUs, several groups) of one worker's active sessions; nothing
    for a worker out of service (released or lost workers hold no load). Mixed: with several
    groups (and `slo_of`), what its cycle against their tightest SLO needs beyond their
    shares, else 0."""
    if w.state not in _IN_SERVICE:
        return 0.0, 0, 0.0, False
    demand = 0.0
    active = 0
    groups = 0
    for g in w.groups:
        if g.batch <= 0:
            continue
        demand += g.batch * share(g.key)
        active += g.batch
        groups += 1
    mixed = 0.0
    if groups > 1 and slo_of is not None:
        slo = min(slo_of(g.key) for g in w.groups if g.batch > 0)
        mixed = max(0.0, w.load_ms / slo - demand)
    return demand, active, mixed, groups > 1
