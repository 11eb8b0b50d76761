"""Regrouping: a worker holding several coalescing groups gives one of them up whole, to
workers of that group, or swaps groups with another mixed worker; never beside another
group, never raising the predicted maximum, nothing on a worker holding one group."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from policy_fakes import FakeCluster, FakeLatencyModel, fake_shape, spec

from turboserve.config import TurboConfig
from turboserve.policy.registry import get_policy
from turboserve.policy.regroup import regroup_moves
from turboserve.policy.turboserve import LazyOrder
from turboserve.policy.demand import scan_cluster
from turboserve.policy.views import Decision
from turboserve.policy.whatif import WhatIf, cache_for
from turboserve.types import SessionState, WorkerState

PROFILE = settings(max_examples=60, deadline=None)
# rounds cost mostly the same whatever their batch, as demo91's (93 ms alone, +2.5 ms per
# session at 4 steps): a second group on a worker costs a whole round
ROUND_BOUND = fake_shape("fake", base_ms=90.0, per_session_ms=3.0, fixed_ms=1.0)
A, B = spec("fake", steps=4), spec("fake", steps=2)


def _cluster(config: TurboConfig | None = None) -> FakeCluster:
    return FakeCluster(FakeLatencyModel(ROUND_BOUND), config=config, now_s=1000.0)


def _groups(view, wid) -> Counter:
    return Counter(view.sessions[s].spec.steps for s in view.workers[wid].sessions
                   if view.sessions[s].state is SessionState.ACTIVE)


def _decide(c: FakeCluster):
    p = get_policy("turboserve-no-autoscale")
    return p.decide(c.view(), p.initial_memory())


def test_a_worker_gives_its_group_up_to_that_groups_workers():
    """2-step sessions went beside 4-step ones because the 2-step worker is full; the
    4-step sessions leave for the 4-step workers (one each: none ends above the source),
    and the worker runs one round."""
    c = _cluster()
    w, x, y, v, z = (c.add_worker() for _ in range(5))
    moved = [c.add_session(w, spec_=A, context=21, arrival_s=float(i)) for i in range(3)]
    stays = c.add_session(w, spec_=B, context=21)
    for dst in (x, y, v):
        for _ in range(2):
            c.add_session(dst, spec_=A, context=21)
    for _ in range(40):
        c.add_session(z, spec_=B, context=21)
    view = c.view()
    assert view.workers[z].load_ms > view.workers[w].load_ms  # no room for the 2-step one
    d = _decide(c)
    assert sorted(m.session_id for m in d.migrations) == sorted(moved)
    assert {m.dst for m in d.migrations} == {x, y, v}
    assert all(m.src == w for m in d.migrations)
    c.apply(d)
    after = c.view()
    assert _groups(after, w) == Counter({2: 1}) and stays in after.workers[w].sessions
    assert after.workers[w].load_ms < view.workers[w].load_ms
    assert max(x.load_ms for x in after.workers.values()) <= max(x.load_ms for x in view.workers.values())


def test_two_mixed_workers_swap_groups_when_no_one_else_has_room():
    c = _cluster()
    p, q = c.add_worker(), c.add_worker()
    for wid, (na, nb) in ((p, (5, 4)), (q, (4, 5))):
        for _ in range(na):
            c.add_session(wid, spec_=A, context=21)
        for _ in range(nb):
            c.add_session(wid, spec_=B, context=21)
    before = c.view()
    d = _decide(c)
    # p keeps the 4-step group (it holds more of it): 8 moves rather than 10
    assert sorted((m.src, m.dst) for m in d.migrations) == [(p, q)] * 4 + [(q, p)] * 4
    c.apply(d)
    after = c.view()
    assert _groups(after, p) == Counter({4: 9}) and _groups(after, q) == Counter({2: 9})
    assert max(w.load_ms for w in after.workers.values()) < max(w.load_ms for w in before.workers.values())


def test_a_group_in_transit_or_cooling_down_stays_whole():
    """A group whose sessions cannot all move keeps its round: moving some saves little."""
    c = _cluster()
    w, x = c.add_worker(), c.add_worker()
    c.add_session(w, spec_=A, context=21)
    c.add_session(w, spec_=A, context=21, last_migrated_s=995.0)  # moved 5 s ago
    c.add_session(w, spec_=B, context=21)
    c.add_session(x, spec_=A, context=21)
    c.add_session(x, spec_=B, context=21)
    view = c.view()
    whatif = WhatIf(view, cache_for(view, None))
    scan = scan_cluster(view, whatif.cache)
    order = LazyOrder(view, whatif, scan.index)()
    moves = regroup_moves(view, whatif, order, set(scan.ready), [w, x], set())
    assert all(view.sessions[m.session_id].worker != w or view.sessions[m.session_id].spec.steps == 2
               for m in moves)


def test_nothing_moves_where_each_worker_holds_one_group():
    c = _cluster()
    w, x = c.add_worker(), c.add_worker()
    for _ in range(6):
        c.add_session(w, spec_=A, context=21)
    c.add_session(x, spec_=B, context=21)
    view = c.view()
    whatif = WhatIf(view, cache_for(view, None))
    scan = scan_cluster(view, whatif.cache)
    assert scan.index.holding_several() == []
    order = LazyOrder(view, whatif, scan.index)()
    assert regroup_moves(view, whatif, order, set(scan.ready), [w, x], set()) == []


def _random_mixed(draw) -> FakeCluster:
    cfg = TurboConfig()
    cfg = replace(cfg, rebalance=replace(cfg.rebalance, regroup_max_sessions=draw(st.sampled_from([4, 16])),
                                         cooldown_s=draw(st.sampled_from([0.0, 10.0]))))
    c = _cluster(cfg)
    least = draw(st.integers(0, 1))  # 1: every worker holds both groups (swaps only)
    for _ in range(draw(st.integers(2, 6))):
        wid = c.add_worker()
        for sp in (A, B):
            for _ in range(draw(st.integers(least, 12))):
                c.add_session(wid, spec_=sp, context=draw(st.sampled_from([0, 9, 21])),
                              arrival_s=draw(st.floats(0.0, 999.0)),
                              last_migrated_s=draw(st.sampled_from([float("-inf"), float("-inf"), 995.0])))
    return c


@PROFILE
@given(st.data())
def test_regrouping_moves_whole_groups_never_mixes_and_never_raises_the_maximum(data):
    c = _random_mixed(data.draw)
    before = c.view()
    whatif = WhatIf(before, cache_for(before, None))
    scan = scan_cluster(before, whatif.cache)
    order = LazyOrder(before, whatif, scan.index)()
    moves = regroup_moves(before, whatif, order, set(scan.ready), list(before.workers), set())
    assert len(moves) <= before.config.rebalance.regroup_max_sessions
    keys = {wid: {g.key for g in w.groups} for wid, w in before.workers.items()}
    for m in moves:
        s = before.sessions[m.session_id]
        assert s.state is SessionState.ACTIVE and s.worker == m.src
        assert before.now_s - s.last_migrated_s >= before.config.rebalance.cooldown_s
        assert not keys[m.dst] or s.spec.compat_key in keys[m.dst], "a regroup joins its own group, or none"
        keys[m.dst].add(s.spec.compat_key)
    moved = {m.session_id for m in moves}
    for m in moves:  # the whole group left: none of its sessions stays active there
        key = before.sessions[m.session_id].spec.compat_key
        stay = [sid for sid in before.workers[m.src].sessions if sid not in moved
                and before.sessions[sid].spec.compat_key == key
                and before.sessions[sid].state is SessionState.ACTIVE]
        assert not stay
    c.apply(Decision(migrations=tuple(moves)))
    after = c.view()
    peak_before = max(w.load_ms for w in before.workers.values())
    assert max(w.load_ms for w in after.workers.values()) <= peak_before + 1e-9
    for w in after.workers.values():
        assert w.used_bytes <= w.memory_bytes
    assert all(w.state is WorkerState.READY for w in after.workers.values())


def test_work_per_decision_is_bounded_however_many_workers_are_mixed(monkeypatch):
    """A sustained peak at the ceiling can mix every worker: only the `MAX_SOURCES`
    heaviest are judged per decision, swaps sought among the `MAX_PARTNERS` lightest."""
    from turboserve.policy import regroup

    c = _cluster()
    for i in range(3 * regroup.MAX_PARTNERS):
        wid = c.add_worker()
        for _ in range(6 + i % 5):
            c.add_session(wid, spec_=A, context=21)
        for _ in range(6 + (i * 7) % 5):
            c.add_session(wid, spec_=B, context=21)
    judged, partners = [], set()
    real_regroup, real_swap = regroup._best_regroup, regroup._best_swap

    def count_regroup(view, whatif, order, ready, wid, *a):
        judged.append(whatif.load(wid))
        return real_regroup(view, whatif, order, ready, wid, *a)

    def count_swap(view, whatif, order, wid, cands, *a):
        partners.update(cands)
        return real_swap(view, whatif, order, wid, cands, *a)
    monkeypatch.setattr(regroup, "_best_regroup", count_regroup)
    monkeypatch.setattr(regroup, "_best_swap", count_swap)
    view = c.view()
    d = _decide(c)
    assert len(judged) <= regroup.MAX_SOURCES and len(partners) <= regroup.MAX_PARTNERS
    loads = sorted((w.load_ms for w in view.workers.values()), reverse=True)
    assert judged[0] == loads[0]  # the heaviest first
    assert d.migrations  # and still some swap among them
