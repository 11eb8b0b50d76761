"""The simulator end to end on a small bursty trace, driving the real controller, policies
and engines: delivery order, determinism, billing, oracle bounds, and the cruise shortcut."""

from __future__ import annotations

from collections import defaultdict

import pytest

from turboserve.config import load_config
from turboserve.policy.registry import FIXED_COUNT, policy_names
from turboserve.sim import oracle
from turboserve.sim.driver import simulate

GPUS = 3  # the small trace is fitted to this many GPUs (conftest.py)

# wall-clock and counters that legitimately differ between two runs of the same inputs
NONDETERMINISTIC = {"decision_ms_p50", "decision_ms_p99", "decision_ms_max", "rounds_cruised"}


def _config(*extra):
    return load_config(None, [f"cluster.gpus={GPUS}", *extra])


def _same(a: dict, b: dict) -> dict:
    diffs = {}
    for k, va in a.items():
        if k in NONDETERMINISTIC:
            continue
        vb = b[k]
        if isinstance(va, float):
            if abs(va - vb) > 1e-6 * max(1.0, abs(va)):
                diffs[k] = (va, vb)
        elif va != vb:
            diffs[k] = (va, vb)
    return diffs


def test_every_due_chunk_is_delivered_once_and_in_order(small_records, model):
    """Across arrivals, idle periods, offloads, restores and migrations (turboserve and
    migrate-only use them on this trace), each session gets chunks 0..n-1 exactly once, in
    order, n = what its periods owe."""
    mechanisms = {"migrations": 0, "offloads": 0, "resumes": 0}
    for policy in ("turboserve", "migrate-only"):
        got: dict[str, list[int]] = defaultdict(list)

        def on_outcome(out, got=got):
            for sid, idx in zip(out.session_ids, out.chunk_indices):
                got[sid].append(idx)

        res = simulate(small_records, policy, model, _config("sim.tick_s=0.5"), on_outcome=on_outcome)
        s = res.summary
        assert s["sessions_unserved"] == 0 and s["sessions_failed"] == 0, policy
        for k in mechanisms:
            mechanisms[k] += s[k]
        for rec in small_records:
            owed = sum(rec.chunks_in_period(i) for i in range(len(rec.periods)))
            assert got[rec.id] == list(range(owed)), (policy, rec.id)
        assert s["chunks"] == sum(len(v) for v in got.values())
    assert all(v > 0 for v in mechanisms.values()), mechanisms  # the mechanisms were exercised


@pytest.mark.parametrize("policy", ["turboserve", "static-ll"])
def test_two_step_counts_on_shared_gpus(mixed_records, model, policy):
    """Two coalescing groups: every chunk once and in order, one group per round, and the
    same report with and without the cruise shortcut."""
    steps = {r.id: r.spec.steps for r in mixed_records}
    assert set(steps.values()) == {2, 4}
    got: dict[str, list[int]] = defaultdict(list)

    def on_outcome(out):
        assert len({steps[sid] for sid in out.session_ids}) == 1  # one group per round
        for sid, idx in zip(out.session_ids, out.chunk_indices):
            got[sid].append(idx)

    res = simulate(mixed_records, policy, model, _config(), on_outcome=on_outcome)
    assert res.summary["sessions_unserved"] == 0 and res.summary["sessions_failed"] == 0
    for rec in mixed_records:
        assert got[rec.id] == list(range(sum(rec.chunks_in_period(i) for i in range(len(rec.periods)))))
    plain = simulate(mixed_records, policy, model, _config(), cruise=False)
    fast = simulate(mixed_records, policy, model, _config(), cruise=True)
    assert _same(plain.summary, fast.summary) == {}


def test_same_seed_gives_the_same_report(small_records, model):
    a = simulate(small_records, "turboserve", model, _config()).summary
    b = simulate(small_records, "turboserve", model, _config()).summary
    assert _same(a, b) == {}


@pytest.mark.parametrize("policy", policy_names())
def test_cruise_shortcut_changes_no_result(small_records, model, policy):
    """Identical rounds run in one step give the report of running them one by one."""
    plain = simulate(small_records, policy, model, _config(), cruise=False)
    fast = simulate(small_records, policy, model, _config(), cruise=True)
    assert _same(plain.summary, fast.summary) == {}
    assert len(plain.controller.decision_ms) == len(fast.controller.decision_ms)
    if policy in ("static-ll", "turboserve-no-autoscale"):
        assert fast.summary["rounds_cruised"] > 0  # the shortcut is exercised


@pytest.mark.parametrize("policy", policy_names())
def test_cruise_changes_no_result_while_sessions_queue(small_records, model, policy):
    """GPUs with room for two sessions each, so sessions queue most of the run: workers
    cruise while the queue waits (a round that changes nothing makes no decision) and the
    report is still the one of running every round."""
    info = model.shape("demo91")
    room = info.weights_bytes + 2 * model.state_bytes("demo91", info.window_frames) + 10**6
    cfg = _config(f"cluster.gpu_memory_bytes={room}")
    plain = simulate(small_records, policy, model, cfg, cruise=False, until_s=300.0)
    fast = simulate(small_records, policy, model, cfg, cruise=True, until_s=300.0)
    assert plain.summary["unfinished_chunks"] > 0  # the queue was there
    assert _same(plain.summary, fast.summary) == {}
    assert len(plain.controller.decision_ms) == len(fast.controller.decision_ms)
    assert fast.summary["rounds_cruised"] > 0


def test_fixed_count_gpu_hours_and_oracle_bound(small_records, model):
    cfg = _config()
    demand = oracle.nominal_demand(small_records)
    slo = {k: 250.0 for k in demand}
    lb = oracle.cost_lower_bound_gpu_hours(demand, model, slo, cfg.cluster.gpu_memory_bytes)
    assert lb > 0
    floor = oracle.latency_floor_ms(small_records, model, cfg.engine.max_batch)
    assert floor > 0
    for name in policy_names():
        res = simulate(small_records, name, model, cfg)
        s = res.summary
        assert lb <= s["gpu_hours"] + 1e-9, name
        assert floor <= s["max_chunk_latency_ms"] + 1e-9, name  # strict under any policy
        if name in FIXED_COUNT:
            assert s["gpus_max"] == GPUS
            assert s["gpu_hours"] == pytest.approx(GPUS * res.end_s / 3600.0, rel=1e-9)
        assert s["gpus_max"] <= GPUS  # the ceiling holds for autoscaling policies too


def test_starved_sessions_count_as_missed(small_records, model):
    """GPUs with room for two sessions each: the rest wait in the queue, and the chunks
    they are owed count as late rather than vanishing from the report."""
    info = model.shape("demo91")
    room = info.weights_bytes + 2 * model.state_bytes("demo91", info.window_frames) + 10**6
    cfg = load_config(None, [f"cluster.gpus={GPUS}", f"cluster.gpu_memory_bytes={room}"])
    res = simulate(small_records, "static-ll", model, cfg, until_s=60.0)
    s = res.summary
    assert s["unfinished_chunks"] > 0
    assert s["slo_attainment"] < 0.95
    assert s["max_chunk_latency_ms"] > 10_000.0


def test_only_phase_reading_policies_end_cruises_before_placing(small_records, model):
    """Settling cruising workers before each arrival is for policies that read round
    phases (turboserve's placement); the others keep cruising, with the same report."""
    from turboserve.policy.registry import get_policy

    assert {n for n in policy_names() if get_policy(n).reads_round_phase} == \
        {n for n in policy_names() if n.startswith("turboserve")}
    plain = simulate(small_records, "static-ll", model, _config(), cruise=False)
    fast = simulate(small_records, "static-ll", model, _config(), cruise=True)
    assert _same(plain.summary, fast.summary) == {}
    assert fast.summary["rounds_cruised"] > 0


def test_phase_reports_keep_workers_cruising(small_records, model, monkeypatch):
    """For turboserve, a cruising worker's completed rounds are reported when placement
    reads its phase (or its load changes) and it cruises on: the report is the one of
    running every round, and most rounds still run in cruise."""
    from turboserve.sim.transport import SimTransport

    calls = []
    original = SimTransport.report_worker
    monkeypatch.setattr(SimTransport, "report_worker",
                        lambda self, wid, now_s: (calls.append(now_s), original(self, wid, now_s))[1])
    plain = simulate(small_records, "turboserve-no-autoscale", model, _config(), cruise=False)
    fast = simulate(small_records, "turboserve-no-autoscale", model, _config(), cruise=True)
    assert _same(plain.summary, fast.summary) == {}
    assert calls, "phase reads report cruising workers' rounds"
    assert fast.summary["rounds_cruised"] > 0.5 * fast.summary["rounds"]


def test_a_cruise_continued_after_a_phase_report_is_the_one_planned_afresh(small_records, model, monkeypatch):
    """After a phase report, a worker cruises on with its cruise shifted by the rounds
    reported (no re-planning); that shifted cruise equals the one `plan_cruise` makes from
    the round `advance` began, field by field."""
    from turboserve.sim import cruise as cruising
    from turboserve.sim.transport import SimTransport

    engines = []
    settle = SimTransport._settle
    monkeypatch.setattr(SimTransport, "_settle", lambda self, w, now_s, recruise=False: (
        engines.append(w.engine), settle(self, w, now_s, recruise))[1])
    shifted = cruising.Cruise.shifted
    checked = []

    def checked_shift(self, c, rnd, gen):
        got = shifted(self, c, rnd, gen)
        want = cruising.plan_cruise(engines[-1], rnd, gen, frozenset())
        if want is None or got is None:
            assert got is want is None or (got is None and want.k < cruising.MIN_ROUNDS)
        else:
            for field in ("t0", "k", "gen", "starts", "durs_ms", "sat_ms", "ctx", "changing", "grow", "told",
                          "end_s"):
                assert getattr(got, field) == getattr(want, field), field
            checked.append(c)
        return got

    monkeypatch.setattr(cruising.Cruise, "shifted", checked_shift)
    simulate(small_records, "turboserve-no-autoscale", model, _config(), cruise=True)
    assert checked, "phase reports continued some cruises"


def test_a_shape_slower_than_playback_is_replayed_to_the_end():
    """wan14b-480p takes ~2 s per 0.75 s chunk: served within its 2.6 s SLO, a 20-minute
    session ends long after its nominal end. The replay must wait for it (before, it was cut
    at the nominal end plus the drain grace and its last chunks counted as missed)."""
    from turboserve.config import TurboConfig
    from turboserve.profile import load_latency_model
    from turboserve.types import Period, SessionRecord, SessionSpec

    spec = SessionSpec(model="wan14b-480p", fps=16, frames_per_chunk=12, steps=4)
    records = [SessionRecord("long", 0.0, spec, (Period(active_s=1200.0),))]
    config = TurboConfig().with_overrides(["cluster.gpus=1", "slo.slo_ms=2600", "sim.progress=false"])
    result = simulate(records, "static-ll", load_latency_model(), config)
    s = result.summary
    assert s["sessions_unserved"] == 0 and s["unfinished_chunks"] == 0
    assert s["chunks"] == 1600 and s["slo_attainment"] == 1.0
    assert result.end_s > 1200.0 + 600.0  # past the old horizon
