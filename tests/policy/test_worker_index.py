"""WorkerIndex kept across calls equals one built afresh, whatever changed in between."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st
from policy_fakes import FakeCluster, spec

from turboserve.policy.demand import scan_cluster
from turboserve.policy.load import GroupLoad
from turboserve.policy.whatif import LoadOrder, ModelCache, WhatIf
from turboserve.policy.worker_index import WorkerIndex
from turboserve.types import WorkerState

STATES = (WorkerState.READY, WorkerState.STARTING, WorkerState.DRAINING, WorkerState.RELEASED)
KEYS = (spec().compat_key, spec(steps=2).compat_key)


def _share(key) -> float:
    return 0.25 if key == KEYS[0] else 0.5


def _slo(key) -> float:
    return 250.0 if key == KEYS[0] else 500.0


def _fields(ix: WorkerIndex) -> tuple:
    return (ix.wids, ix.demand, ix.active, ix.mixed, ix.several, ix.by_load, ix.entry, ix.ready, ix.starting, ix.draining,
            ix.max_load_ms(), ix.min_ready_load_ms())


change = st.tuples(
    st.integers(0, 11),  # which worker (modulo the count)
    st.sampled_from(STATES),
    st.floats(0.0, 500.0, allow_nan=False),  # new load
    st.integers(0, 4), st.integers(0, 4),  # batches of the two groups
)
step = st.one_of(st.lists(change, min_size=0, max_size=4).map(lambda c: ("change", c)),
                 st.just(("add", None)), st.integers(0, 11).map(lambda i: ("remove", i)))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.lists(step, min_size=1, max_size=12))
def test_an_index_kept_across_changes_equals_one_built_afresh(n_workers, steps):
    cluster = FakeCluster()
    for _ in range(n_workers):
        cluster.add_worker()
    view = cluster.view()
    kept = WorkerIndex()
    kept.refresh(view, _share, _slo)
    counter = 0
    for kind, arg in steps:
        workers = dict(view.workers)
        if kind == "add" or not workers:
            counter += 1
            template = next(iter(cluster.view().workers.values()))
            workers[f"x{counter:03d}"] = replace(template, id=f"x{counter:03d}")
        elif kind == "remove" and len(workers) > 1:
            del workers[list(workers)[arg % len(workers)]]
        elif kind == "change":
            for i, state, load, b0, b1 in arg:
                wid = list(workers)[i % len(workers)]
                groups = tuple(GroupLoad(k, b, 3.0 * b) for k, b in zip(KEYS, (b0, b1)) if b)
                # a new record object, as the controller makes on every change
                workers[wid] = replace(workers[wid], state=state, load_ms=load, groups=groups)
        view = replace(view, workers=MappingProxyType(workers))
        kept.refresh(view, _share, _slo)
        fresh = WorkerIndex()
        fresh.refresh(view, _share, _slo)
        assert _fields(kept) == _fields(fresh)
        for i, w in enumerate(view.workers.values()):  # several groups: the cycle at the tighter SLO
            live = [g for g in w.groups if g.batch > 0] if w.state in STATES[:3] else []
            want = max(0.0, w.load_ms / 250.0 - kept.demand[i]) if len(live) > 1 else 0.0
            assert kept.mixed[i] == want
            assert kept.several[i] == (len(live) > 1)
        assert kept.holding_several() == [w for w, x in zip(kept.wids, kept.several) if x]


def test_the_load_order_from_the_index_is_the_one_built_from_the_view():
    cluster = FakeCluster()
    wids = [cluster.add_worker() for _ in range(5)]
    for i, wid in enumerate(wids):
        for _ in range(i % 3):
            cluster.add_session(wid, context=6.0)
    pending = cluster.add_session()
    view = cluster.view()
    cache = ModelCache(view.model, view.config.engine.max_batch)
    scan_cluster(view, cache)  # refreshes the cache's index
    index = cache.worker_index(view.config.slo.slo_ms)
    for apply_first in (False, True):
        a, b = WhatIf(view, cache), WhatIf(view, cache)
        key = view.sessions[pending].spec.compat_key
        if apply_first:  # a change made before the order is built (as in-flight moves are)
            for wi in (a, b):
                wi.add(wids[0], key, 0.0, 10, active=True)
        from_view = LoadOrder(a, view.workers.keys())
        from_index = LoadOrder.of_index(b, index)
        assert list(from_index.ascending()) == list(from_view.ascending())
        for wi in (a, b):  # and they stay equal as the what-if changes
            wi.add(wids[1], key, 0.0, 10, active=True)
        assert list(from_index.ascending()) == list(from_view.ascending())
