"""Each baseline behaves as DESIGN.md defines it; the registry; a 256 x 8 view decides."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from policy_fakes import FakeCluster, run_policy

from turboserve.config import TurboConfig
from turboserve.policy.registry import ALL, FIXED_COUNT, get_policy, policy_names
from turboserve.policy.views import Placement
from turboserve.types import SessionState, WorkerState


def _cfg(gpus: int = 8, **autoscale) -> TurboConfig:
    c = TurboConfig()
    return replace(c, cluster=replace(c.cluster, gpus=gpus, min_gpus=1),
                   autoscale=replace(c.autoscale, **autoscale))


def test_static_rr_cycles_across_calls_and_skips_full_workers():
    c = FakeCluster(config=_cfg(gpus=3))
    ws = [c.add_worker() for _ in range(3)]
    p = get_policy("static-rr")
    for _ in range(4):
        c.add_session(None)
    d, mem = run_policy(p, c)
    assert [x.worker_id for x in d.placements] == [ws[0], ws[1], ws[2], ws[0]]
    for _ in range(2):
        c.add_session(None)
    d, mem = run_policy(p, c, mem)
    assert [x.worker_id for x in d.placements] == [ws[1], ws[2]]
    # a worker without room is skipped, the cycle goes on
    c.workers[ws[0]].memory_bytes = c.view().workers[ws[0]].used_bytes
    for _ in range(3):
        c.add_session(None)
    d, mem = run_policy(p, c, mem)
    assert [x.worker_id for x in d.placements] == [ws[1], ws[2], ws[1]]


def test_static_rr_ignores_load():
    c = FakeCluster(config=_cfg(gpus=2))
    a, _ = c.add_worker(), c.add_worker()
    for _ in range(10):
        c.add_session(a, context=21)
    sid = c.add_session(None)
    p = get_policy("static-rr")
    assert p.decide(c.view(), p.initial_memory()).placements == (Placement(sid, a),)


def test_static_ll_picks_the_least_loaded_and_spreads_a_batch():
    c = FakeCluster(config=_cfg(gpus=3))
    a, b, d_ = c.add_worker(), c.add_worker(), c.add_worker()
    for _ in range(3):
        c.add_session(a, context=21)
    c.add_session(b, context=21)
    new = [c.add_session(None) for _ in range(3)]
    p = get_policy("static-ll")
    d = p.decide(c.view(), p.initial_memory())
    assert [x.worker_id for x in d.placements] == [d_, d_, b]  # 40 ms < 46 ms, then 60 > 46
    assert [x.session_id for x in d.placements] == new


@pytest.mark.parametrize("name", sorted(FIXED_COUNT))
def test_fixed_count_policies_never_scale(name):
    cfg = _cfg(gpus=4, scale_in_hold_s=0.0)
    p = get_policy(name)
    assert p.initial_gpus(cfg) == 4
    c = FakeCluster(config=cfg)
    for _ in range(4):
        c.add_worker()
    mem = None
    for t in range(0, 3000, 150):  # a burst far over capacity, then nothing at all
        c.advance(float(t))
        if t == 0:
            for _ in range(400):
                c.add_session(None)
        if t == 1500:
            for sid in list(c.sessions):
                c.depart(sid)
        d, mem = run_policy(p, c, mem)
        assert d.scale_out == 0 and d.release == () and d.cancel_release == ()
    assert c.count(WorkerState.READY) == 4


@pytest.mark.parametrize("name", ["static-rr", "static-ll", "autoscale-only", "migrate-only"])
def test_baselines_never_offload(name):
    c = FakeCluster(config=_cfg(), now_s=1000.0, memory_bytes=3 * 10**9)
    w = c.add_worker()
    c.add_session(w, context=21, state=SessionState.IDLE, since_s=0.0)
    c.add_session(w, context=21, state=SessionState.IDLE, since_s=0.0)
    c.add_session(None)
    p = get_policy(name)
    d = p.decide(c.view(), p.initial_memory())
    assert d.offloads == () and d.placements == ()


def test_autoscale_only_upscales_after_its_delay_to_ongoing_over_capacity():
    cfg = _cfg(gpus=16, upscale_delay_s=30.0, downscale_delay_s=600.0)
    c = FakeCluster(config=cfg)
    c.add_worker()
    p = get_policy("autoscale-only")
    cap = c.model.capacity("fake", 750.0, 4)
    for _ in range(3 * cap + 1):
        c.add_session(None)
    d, mem = run_policy(p, c)
    assert d.scale_out == 0 and d.migrations == ()
    for t in (10.0, 29.0):
        c.advance(t)
        d, mem = run_policy(p, c, mem)
        assert d.scale_out == 0
    c.advance(30.0)
    d, mem = run_policy(p, c, mem)
    assert d.scale_out == math.ceil((3 * cap + 1) / cap) - 1  # desired = ongoing / capacity


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.3])
def test_autoscale_only_targets_a_share_of_capacity(fraction):
    """`target_capacity_fraction` lowers the per-GPU target (Ray Serve's target_ongoing_requests
    below capacity): desired = ongoing / (fraction * capacity), within the ceiling."""
    cfg = _cfg(gpus=16, upscale_delay_s=0.0, target_capacity_fraction=fraction)
    c = FakeCluster(config=cfg)
    c.add_worker()
    p = get_policy("autoscale-only")
    cap = c.model.capacity("fake", 750.0, 4)
    for _ in range(2 * cap):
        c.add_session(None)
    d, _ = run_policy(p, c)
    assert d.scale_out == min(16, math.ceil(2 / fraction - 1e-9)) - 1


def test_autoscale_only_upscale_timer_resets_when_demand_dips():
    c = FakeCluster(config=_cfg(gpus=16, upscale_delay_s=30.0))
    w = c.add_worker()
    p = get_policy("autoscale-only")
    cap = c.model.capacity("fake", 750.0, 4)
    extra = [c.add_session(w) for _ in range(2 * cap)]
    d, mem = run_policy(p, c)
    c.advance(20.0)
    for sid in extra[cap:]:
        c.depart(sid)
    d, mem = run_policy(p, c, mem)  # desired == current: the timer stops
    c.advance(25.0)
    for _ in range(cap):
        c.add_session(w)
    d, mem = run_policy(p, c, mem)
    c.advance(50.0)
    d, mem = run_policy(p, c, mem)
    assert d.scale_out == 0  # only 25 s above, not 30
    c.advance(55.0)
    d, mem = run_policy(p, c, mem)
    assert d.scale_out == 1


def test_autoscale_only_downscales_after_its_delay_empty_workers_first_no_migration():
    cfg = _cfg(gpus=8, downscale_delay_s=600.0)
    c = FakeCluster(config=cfg)
    ws = [c.add_worker() for _ in range(4)]
    c.add_session(ws[0], context=21)
    c.add_session(ws[2], context=21)
    p = get_policy("autoscale-only")
    d, mem = run_policy(p, c)
    assert d.release == ()
    c.advance(599.0)
    d, mem = run_policy(p, c, mem)
    assert d.release == ()
    c.advance(600.0)
    d, mem = run_policy(p, c, mem)
    # desired = ceil(2 / capacity) = 1: three go, the empty ones first, then the lightest
    assert len(d.release) == 3 and set(d.release) >= {ws[1], ws[3]}
    assert d.migrations == ()
    # a released worker holding a session is not emptied by force: it drains naturally
    for t in range(601, 700, 10):
        c.advance(float(t))
        d, mem = run_policy(p, c, mem)
        assert d.migrations == () and d.offloads == ()
    assert c.count(WorkerState.DRAINING) == 1 and len(c.workers) == 2


def test_migrate_only_balances_only_on_its_polling_interval():
    cfg = replace(_cfg(gpus=2), rebalance=replace(TurboConfig().rebalance, poll_interval_s=5.0, cooldown_s=0.0))
    c = FakeCluster(config=cfg)
    a, b = c.add_worker(), c.add_worker()
    for i in range(8):
        c.add_session(a, context=21, arrival_s=float(i))
    p = get_policy("migrate-only")
    d, mem = run_policy(p, c)
    assert d.migrations and all(m.src == a and m.dst == b for m in d.migrations)
    # skew again right away: no move until the next poll
    for _ in range(8):
        c.add_session(a, context=21)
    for t in (1.0, 2.0, 4.9):
        c.advance(t)
        d, mem = run_policy(p, c, mem)
        assert d.migrations == ()
    c.advance(5.0)
    d, mem = run_policy(p, c, mem)
    assert d.migrations
    assert all(m.src == a and m.dst == b for m in d.migrations)


def test_migrate_only_does_not_move_when_it_would_not_help():
    c = FakeCluster(config=_cfg(gpus=2))
    a, b = c.add_worker(), c.add_worker()
    for _ in range(4):
        c.add_session(a, context=21)
    for _ in range(3):
        c.add_session(b, context=21)
    p = get_policy("migrate-only")
    assert p.decide(c.view(), p.initial_memory()).migrations == ()


def test_registry_names_and_errors():
    assert policy_names() == ["static-rr", "static-ll", "autoscale-only", "migrate-only", "turboserve",
                              "turboserve-no-migration", "turboserve-no-autoscale", "turboserve-no-offload"]
    assert tuple(policy_names()) == ALL
    for name in ALL:
        p = get_policy(name)
        assert p.name == name
        assert get_policy(name) is not p  # fresh, independent instances
    assert get_policy("turboserve --no-migration").name == "turboserve-no-migration"
    assert get_policy(" Static-LL ").name == "static-ll"
    with pytest.raises(ValueError, match="static-rr, static-ll"):
        get_policy("round-robin")


def test_initial_gpus():
    cfg = replace(_cfg(gpus=10), cluster=replace(_cfg().cluster, gpus=10, min_gpus=2))
    assert get_policy("static-rr").initial_gpus(cfg) == 10
    assert get_policy("turboserve").initial_gpus(cfg) == 2
    assert get_policy("autoscale-only").initial_gpus(cfg) == 2
    cfg2 = replace(cfg, autoscale=replace(cfg.autoscale, initial_gpus=5))
    assert get_policy("turboserve").initial_gpus(cfg2) == 5
    assert get_policy("turboserve-no-autoscale").initial_gpus(cfg2) == 10


def test_every_policy_decides_on_a_256_by_8_view():
    """Bench-free: a large view runs through every policy (timing is in bench/)."""
    rng = random.Random(7)
    cfg = _cfg(gpus=256)
    c = FakeCluster(config=cfg, now_s=500.0)
    ws = [c.add_worker() for _ in range(256)]
    for w in ws:
        for _ in range(rng.choice([7, 8, 8, 9])):
            idle = rng.random() < 0.05
            c.add_session(w, context=rng.choice([21, 21, 9]), arrival_s=rng.uniform(0, 500),
                          state=SessionState.IDLE if idle else SessionState.ACTIVE,
                          since_s=rng.uniform(480, 500))
    for _ in range(4):
        c.add_session(None)
    view = c.view()
    assert len(view.sessions) > 2000
    for name in ALL:
        p = get_policy(name)
        d = p.decide(view, p.initial_memory())
        assert len(d.placements) == 4
        d2 = p.decide(view, d.memory)
        if name != "static-rr":  # round-robin moves on; the others see the same view alike
            assert d2.placements == d.placements
