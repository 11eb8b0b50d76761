"""What-if loads match a brute-force rebuild; placement respects memory, READY workers and
compatibility, and picks the min-max worker."""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from policy_fakes import GB, FakeCluster, FakeLatencyModel, TWO_SHAPES, random_cluster, spec

from turboserve.config import TurboConfig
from turboserve.policy.load import GroupLoad, cycle_ms
from turboserve.policy.registry import get_policy
from turboserve.policy.views import Decision, Migration, Placement
from turboserve.policy.whatif import LoadOrder, ModelCache, WhatIf, groups_plus
from turboserve.types import SessionState, WorkerState

PROFILE = settings(max_examples=60, deadline=None)


@PROFILE
@given(st.data())
def test_whatif_equals_brute_force_after_random_moves(data):
    c = random_cluster(data.draw, st, states=(WorkerState.READY,), idle=True)
    view = c.view()
    cache = ModelCache(c.model, c.config.engine.max_batch)
    wi = WhatIf(view, cache)
    order = LoadOrder(wi, view.workers.keys())
    wids = list(view.workers)
    moves, placements = [], []
    for sid in view.pending:
        wid = data.draw(st.sampled_from(wids))
        s = view.sessions[sid]
        wi.add(wid, s.spec.compat_key, s.context_frames, s.state_bytes)
        placements.append(Placement(sid, wid))
    for sid, s in sorted(view.sessions.items()):
        if s.worker is None or not data.draw(st.booleans()):
            continue
        dst = data.draw(st.sampled_from(wids))
        if dst == s.worker:
            continue
        wi.move(s.worker, dst, s.spec.compat_key, s.context_frames, s.state_bytes,
                active=s.state is SessionState.ACTIVE)
        moves.append(Migration(sid, s.worker, dst))
    c.apply(Decision(placements=tuple(placements), migrations=tuple(moves)), instant=False)
    # memory as while the moves are in flight: the source holds, the destination has reserved
    for wid, w in c.view().workers.items():
        assert wi.used_bytes(wid) == w.used_bytes
    c.finish_migrations()
    # loads as once they commit
    for wid, w in c.view().workers.items():
        assert math.isclose(wi.load(wid), w.load_ms, rel_tol=1e-9, abs_tol=1e-9)
    # the order stayed sorted by what-if load
    loads = [e[0] for e in order.ascending()]
    assert loads == sorted(loads)
    top = order.top()
    assert top[0] == max(wi.load(w) for w in wids)


def test_cycle_of_unchanged_view_is_bit_identical():
    c = FakeCluster(FakeLatencyModel(*TWO_SHAPES))
    w = c.add_worker()
    for ctx in (0, 3, 21):
        c.add_session(w, context=ctx)
        c.add_session(w, context=ctx, spec_=spec("big"))
    view = c.view()
    cache = ModelCache(c.model, 32)
    assert cache.cycle_ms(view.workers[w].groups) == view.workers[w].load_ms


def test_a_different_key_never_joins_a_group():
    g = (GroupLoad(spec("fake", steps=4).compat_key, 3, 30.0),)
    out = groups_plus(g, spec("fake", steps=2).compat_key, 5.0)
    assert len(out) == 2 and out[0] == g[0] and out[1].batch == 1
    out = groups_plus(g, spec("fake", steps=4).compat_key, 5.0)
    assert len(out) == 1 and out[0].batch == 4 and out[0].context_sum == 35.0


def _memory_ok(c: FakeCluster, d) -> None:
    """Placements fit: used + full state + largest activation within memory less headroom."""
    view = c.view()
    headroom = c.config.placement.memory_headroom
    added: dict[str, list] = {}
    for p in d.placements:
        assert view.workers[p.worker_id].state is WorkerState.READY
        added.setdefault(p.worker_id, []).append(view.sessions[p.session_id])
    for wid, sessions in added.items():
        w = view.workers[wid]
        groups = w.groups
        for s in sessions:
            groups = groups_plus(groups, s.spec.compat_key, s.context_frames)
        act = max(c.model.activation_bytes(g.key.model, min(g.batch, 32)) for g in groups)
        need = sum(c.full_bytes(s.spec.model) for s in sessions)
        assert w.used_bytes + need + act + int(headroom * w.memory_bytes) <= w.memory_bytes


@PROFILE
@given(st.data())
def test_placements_fit_memory_and_target_ready_workers(data):
    c = random_cluster(data.draw, st, max_pending=12)
    name = data.draw(st.sampled_from(["turboserve", "static-ll", "static-rr", "autoscale-only", "migrate-only"]))
    p = get_policy(name)
    view = c.view()
    d = p.decide(view, p.initial_memory())
    _memory_ok(c, d)
    placed = [x.session_id for x in d.placements]
    assert len(placed) == len(set(placed))
    assert set(placed) <= set(view.pending)
    # pending sessions are placed in arrival order: once one is left, no later one of the
    # same CompatKey is placed
    left_keys = set()
    for sid in view.pending:
        key = view.sessions[sid].spec.compat_key
        if sid in placed:
            assert key not in left_keys
        else:
            left_keys.add(key)
    c.apply(d)
    for w in c.view().workers.values():
        for g in w.groups:
            members = [c.sessions[s] for s in w.sessions if c.sessions[s].state is SessionState.ACTIVE
                       and c.sessions[s].spec.compat_key == g.key]
            assert g.batch == len(members)


@PROFILE
@given(st.data())
def test_min_max_placement_is_optimal_for_one_session(data):
    """Min-max among the workers where the session starts no group beside other groups
    while the best of those keeps the SLO, else among all."""
    c = random_cluster(data.draw, st, max_pending=0, config=TurboConfig())
    sid = c.add_session(None, spec_=data.draw(st.sampled_from([spec("fake"), spec("big")])),
                        context=data.draw(st.sampled_from([0, 21])))
    view = c.view()
    p = get_policy("turboserve-no-autoscale")
    d = p.decide(replace(view, config=replace(view.config, rebalance=replace(view.config.rebalance, enabled=False))),
                 p.initial_memory())
    s = view.sessions[sid]
    key = s.spec.compat_key
    cache = ModelCache(c.model, 32)
    wi = WhatIf(view, cache)
    options = []  # (resulting max, resulting load on the worker, holds the key, worker)
    apart = []  # those where it starts no group beside other groups
    for wid, w in view.workers.items():
        if w.state is not WorkerState.READY or not wi.fits(wid, key, c.full_bytes(key.model), 0.05):
            continue
        after = cycle_ms(groups_plus(w.groups, key, s.context_frames), c.model)
        others = max((v.load_ms for o, v in view.workers.items() if o != wid), default=0.0)
        holds = any(g.key == key for g in w.groups)
        options.append((max(others, after), after, holds, wid))
        if holds or not w.groups:
            apart.append(options[-1])
    placed = {x.session_id: x.worker_id for x in d.placements}
    if not options:
        assert sid not in placed
        return
    assert sid in placed
    # beside its own group (or alone) wherever that keeps the worker within the SLO,
    # else the min-max worker of all
    best = min(apart) if apart and min(apart)[1] <= view.slo_ms(s.spec) else min(options)
    if best not in apart:
        options = [o for o in options if o not in apart]
    else:
        options = apart
    chosen = [o for o in options if o[3] == placed[sid]][0]
    assert math.isclose(chosen[0], best[0], rel_tol=1e-12, abs_tol=1e-9)
    assert math.isclose(chosen[1], best[1], rel_tol=1e-12, abs_tol=1e-9)
    tied = [o for o in options if math.isclose(o[0], best[0], rel_tol=1e-12, abs_tol=1e-9)
            and math.isclose(o[1], best[1], rel_tol=1e-12, abs_tol=1e-9)]
    if any(o[2] for o in tied):
        assert chosen[2], "a worker holding the CompatKey was no worse, yet another was chosen"


def test_several_placements_in_one_call_see_each_other():
    c = FakeCluster()
    for _ in range(8):
        c.add_worker()
    for _ in range(16):
        c.add_session(None)
    p = get_policy("turboserve-no-autoscale")
    d = p.decide(c.view(), p.initial_memory())
    per = {}
    for x in d.placements:
        per[x.worker_id] = per.get(x.worker_id, 0) + 1
    assert sorted(per.values()) == [2] * 8


def test_coalescing_preferred_when_no_worse():
    """Two workers at the same load, one running the session's CompatKey, the other another
    key (same model, other chunk length): joining the group costs less than a new round."""
    c = FakeCluster(FakeLatencyModel(*TWO_SHAPES))
    b, a = c.add_worker(), c.add_worker()
    for _ in range(3):
        c.add_session(a, context=21, spec_=spec("fake", steps=4))
        c.add_session(b, context=21, spec_=spec("fake", steps=4, frames=8))
    sid = c.add_session(None, spec_=spec("fake", steps=4))
    p = get_policy("turboserve-no-autoscale")
    d = p.decide(c.view(), p.initial_memory())
    assert d.placements == (Placement(sid, a),)


def test_min_max_beats_least_loaded_when_joining_a_group_is_cheaper():
    c = FakeCluster(FakeLatencyModel(*TWO_SHAPES))
    b, a = c.add_worker(), c.add_worker()
    for _ in range(3):
        c.add_session(a, context=21, spec_=spec("fake", steps=4))  # 98.9 ms, same key
        c.add_session(b, context=15, spec_=spec("fake", steps=4, frames=8))  # 93.5 ms
    sid = c.add_session(None, spec_=spec("fake", steps=4))
    view = c.view()
    assert view.workers[b].load_ms < view.workers[a].load_ms
    p = get_policy("turboserve-no-autoscale")
    assert p.decide(view, p.initial_memory()).placements == (Placement(sid, a),)
    ll = get_policy("static-ll")
    assert ll.decide(view, ll.initial_memory()).placements == (Placement(sid, b),)


def test_activation_memory_is_reserved():
    """Room for the state but not for the round's activations: not feasible."""
    full = 100 * 10**6 + 50 * 10**6 * 21
    headroom = 0.05
    act = 200 * 10**6
    mem = int((2 * full + act) / (1 - headroom)) + 10
    c = FakeCluster(memory_bytes=mem)
    w = c.add_worker()
    c.add_session(w, context=21)
    sid = c.add_session(None)
    p = get_policy("static-ll")
    assert p.decide(c.view(), p.initial_memory()).placements == ()  # 2 sessions need 2 x act
    c.memory_bytes = mem + int(act / (1 - headroom)) + 10
    c.workers[w].memory_bytes = c.memory_bytes
    assert p.decide(c.view(), p.initial_memory()).placements == (Placement(sid, w),)


def test_no_room_leaves_pending_and_not_ready_workers_are_skipped():
    c = FakeCluster(memory_bytes=3 * GB)
    a = c.add_worker()
    c.add_worker(WorkerState.STARTING)
    c.add_worker(WorkerState.DRAINING)
    c.add_session(a, context=21)
    c.add_session(a, context=21)
    sid = c.add_session(None)
    for name in ("turboserve-no-offload", "static-ll", "static-rr"):
        p = get_policy(name)
        d = p.decide(c.view(), p.initial_memory())
        assert d.placements == (), name
        assert sid in c.view().pending


def test_placement_scores_at_most_candidate_workers():
    """With a budget of one scored worker the choice is the lightest feasible one, even
    where a heavier worker holding the key would have been better."""
    c = FakeCluster(FakeLatencyModel(*TWO_SHAPES))
    b, a = c.add_worker(), c.add_worker()
    for _ in range(3):
        c.add_session(a, context=21, spec_=spec("fake", steps=4))
        c.add_session(b, context=15, spec_=spec("fake", steps=4, frames=8))
    sid = c.add_session(None, spec_=spec("fake", steps=4))
    p = get_policy("turboserve-no-autoscale")
    assert p.decide(c.view(), p.initial_memory()).placements == (Placement(sid, a),)
    c.config = replace(c.config, placement=replace(c.config.placement, candidate_workers=1))
    assert p.decide(c.view(), p.initial_memory()).placements == (Placement(sid, b),)


def _group_and_other(slo_ms: float | None = None) -> tuple[FakeCluster, str, str, str]:
    """Worker `a` runs three sessions of 4 steps, the lighter `b` one session of 2 steps;
    a new 4-step session is pending."""
    cfg = TurboConfig()
    if slo_ms is not None:
        cfg = replace(cfg, slo=replace(cfg.slo, slo_ms=slo_ms))
    c = FakeCluster(config=cfg)
    a, b = c.add_worker(), c.add_worker()
    for _ in range(3):
        c.add_session(a, context=21, spec_=spec("fake", steps=4))
    c.add_session(b, context=21, spec_=spec("fake", steps=2))
    sid = c.add_session(None, spec_=spec("fake", steps=4))
    return c, a, b, sid


def test_a_session_joins_its_group_rather_than_start_one_beside_another():
    """Beside `b`'s group it would run a round of its own: `b` ends lighter than `a` would,
    but every later session of either group there pays both rounds."""
    c, a, b, sid = _group_and_other()
    view = c.view()
    key = spec("fake", steps=4).compat_key
    on_a = cycle_ms(groups_plus(view.workers[a].groups, key, 0.0), c.model)
    on_b = cycle_ms(groups_plus(view.workers[b].groups, key, 0.0), c.model)
    assert on_b < on_a <= view.slo_ms(spec())  # plain min-max would pick b
    p = get_policy("turboserve-no-autoscale")
    assert p.decide(view, p.initial_memory()).placements == (Placement(sid, a),)


def test_a_session_goes_beside_another_group_when_its_own_would_miss_the_slo():
    c, a, b, sid = _group_and_other()
    view = c.view()
    key = spec("fake", steps=4).compat_key
    on_a = cycle_ms(groups_plus(view.workers[a].groups, key, 0.0), c.model)
    on_b = cycle_ms(groups_plus(view.workers[b].groups, key, 0.0), c.model)
    c, a, b, sid = _group_and_other(slo_ms=(on_a + on_b) / 2)  # a would miss it, b not
    p = get_policy("turboserve-no-autoscale")
    assert p.decide(c.view(), p.initial_memory()).placements == (Placement(sid, b),)
