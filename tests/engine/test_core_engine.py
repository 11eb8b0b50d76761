"""EngineCore: coalescing by CompatKey, per-chunk latency, exactly-once in-order delivery,
period ends, memory tiers and error isolation, with the real latency model and the
profiled executor."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turboserve.config import TurboConfig
from turboserve.engine.core import EngineCore, PoolFullError, SessionError, Tier
from turboserve.engine.executor import RoundPlan, RoundResult
from turboserve.engine.profiled import ProfiledExecutor, read_tag, session_tag
from turboserve.profile import load_latency_model
from turboserve.types import SessionSpec

MODEL = load_latency_model()
CFG = TurboConfig()
A = SessionSpec(model="demo91", frames_per_chunk=4, steps=4)
B = SessionSpec(model="demo91", frames_per_chunk=4, steps=2)  # another CompatKey
GB = 10**9


def make_engine(memory_bytes: int = 60 * GB, max_batch: int = 4, executor=None) -> EngineCore:
    ex = executor or ProfiledExecutor(MODEL, CFG, frames=True)
    return EngineCore("w0", ex, memory_bytes=memory_bytes, max_batch=max_batch)


def run_one(eng: EngineCore, now_s: float):
    rnd = eng.begin_round(now_s)
    assert rnd is not None
    return eng.finish_round(rnd, rnd.finish_s)


def test_rounds_coalesce_one_compat_group_oldest_first():
    eng = make_engine(max_batch=2)
    eng.add_session("a1", A, "p", 0.0)
    eng.add_session("b1", B, "p", 1.0)
    eng.add_session("a2", A, "p", 2.0)
    eng.add_session("a3", A, "p", 3.0)
    out = run_one(eng, 10.0)
    # group A's oldest chunk (due at 0) waited longest; max_batch=2 takes a1, a2
    assert out.key == A.compat_key and out.session_ids == ("a1", "a2")
    first_finish = out.finished_s
    out = run_one(eng, out.finished_s)
    assert out.key == B.compat_key and out.session_ids == ("b1",)  # b1 due since 1.0
    out = run_one(eng, out.finished_s)
    # a3 (due at 3.0) first, then a1, due again since its first chunk was delivered
    assert out.session_ids == ("a3", "a1")
    assert out.due_s == (3.0, first_finish)
    assert out.deliveries[0].latency_ms == pytest.approx((out.finished_s - 3.0) * 1000)


def test_latency_is_delivery_minus_due_and_next_chunk_due_at_delivery():
    eng = make_engine()
    eng.add_session("s", A, "p", 5.0)
    rnd = eng.begin_round(7.0)
    assert rnd.due_s == (5.0,)
    out = eng.finish_round(rnd, 7.5)
    (d,) = out.deliveries
    assert (d.session_id, d.chunk_index, d.due_s) == ("s", 0, 5.0)
    assert d.latency_ms == pytest.approx(2500.0)
    rnd = eng.begin_round(9.0)
    assert rnd.due_s == (7.5,) and rnd.plan.chunk_indices == (1,)


def test_period_end_makes_session_idle_and_is_reported():
    eng = make_engine()
    eng.add_session("s", A, "p", 0.0, chunks_wanted=2)
    assert run_one(eng, 0.0).became_idle == []
    out = run_one(eng, 1.0)
    assert out.became_idle == ["s"]
    assert not eng.has_due_work() and not eng.info("s").active
    eng.activate("s", 5.0, chunks_wanted=1)
    out = run_one(eng, 5.0)
    assert out.chunk_indices == (2,) and out.became_idle == ["s"]


def test_failure_of_one_session_leaves_others_running():
    ex = ProfiledExecutor(MODEL, CFG, frames=True)
    eng = make_engine(executor=ex)
    for sid in ("a", "b", "c"):
        eng.add_session(sid, A, "p", 0.0)
    ex.inject_failure("b", "boom")
    out = run_one(eng, 0.0)
    assert out.failed == {"b": "boom"}
    assert out.session_ids == ("a", "c")
    assert "b" not in eng and eng.pool.bytes_of("b") == 0
    out = run_one(eng, out.finished_s)
    assert out.session_ids == ("a", "c") and out.chunk_indices == (1, 1)


class RaisingExecutor(ProfiledExecutor):
    """Raises for the whole batch whenever session `bad` is in it (a batch-level crash)."""

    def execute(self, plan: RoundPlan) -> RoundResult:
        if "bad" in plan.session_ids:
            raise RuntimeError("kernel crashed")
        return super().execute(plan)


def test_batch_exception_is_isolated_to_the_culprit():
    ex = RaisingExecutor(MODEL, CFG)
    eng = make_engine(executor=ex)
    for sid in ("a", "bad", "c"):
        eng.add_session(sid, A, "p", 0.0)
    out = run_one(eng, 0.0)
    assert set(out.session_ids) == {"a", "c"}
    assert list(out.failed) == ["bad"] and "kernel crashed" in out.failed["bad"]


def test_memory_full_is_refused_without_change():
    per = ProfiledExecutor(MODEL, CFG).estimate_bytes(A)
    eng = make_engine(memory_bytes=2 * per)
    eng.add_session("a", A, "p", 0.0)
    eng.add_session("b", A, "p", 0.0)
    with pytest.raises(PoolFullError, match="more bytes"):
        eng.add_session("c", A, "p", 0.0)
    assert "c" not in eng and eng.pool.used_bytes == 2 * per
    eng.pause("b", 0.0)
    eng.offload("b")
    assert eng.info("b").tier is Tier.HOST and eng.pool.used_bytes == per
    eng.add_session("c", A, "p", 0.0)
    with pytest.raises(PoolFullError):
        eng.restore("b")
    assert eng.info("b").tier is Tier.HOST


def test_unknown_session_and_bad_arguments_name_the_problem():
    eng = make_engine()
    with pytest.raises(SessionError, match="'nope' is not on this engine"):
        eng.activate("nope", 0.0)
    with pytest.raises(ValueError, match="chunks_wanted"):
        eng.add_session("x", A, "p", 0.0, chunks_wanted=-1)
    eng.add_session("x", A, "p", 0.0)
    with pytest.raises(SessionError, match="already"):
        eng.add_session("x", A, "p", 0.0)


def test_step_runs_live_loop_with_a_clock():
    eng = make_engine()
    eng.add_session("s", A, "p", 0.0)
    times = iter([1.0, 1.25])
    out = eng.step(lambda: next(times))
    assert out.session_ids == ("s",) and out.deliveries[0].latency_ms == pytest.approx(1250.0)
    eng.pause("s", 2.0)
    assert eng.step(lambda: 3.0) is None


def test_snapshot_groups_and_bytes():
    eng = make_engine()
    eng.add_session("a", A, "p", 0.0)
    eng.add_session("b", B, "p", 0.0)
    eng.add_session("c", A, "p", 0.0, active=False)
    snap = eng.snapshot()
    assert {(g.key, g.batch) for g in snap.groups} == {(A.compat_key, 1), (B.compat_key, 1)}
    assert snap.used_bytes == 3 * ProfiledExecutor(MODEL, CFG).estimate_bytes(A)
    assert set(snap.resident) == {"a", "b", "c"} and snap.due == 2


# --- the exactly-once, in-order property over random command sequences -------------------

SIDS = ["s0", "s1", "s2", "s3", "s4"]
op = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(SIDS), st.booleans(), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("activate"), st.sampled_from(SIDS), st.integers(0, 4)),
    st.tuples(st.just("pause"), st.sampled_from(SIDS)),
    st.tuples(st.just("remove"), st.sampled_from(SIDS)),
    st.tuples(st.just("offload"), st.sampled_from(SIDS)),
    st.tuples(st.just("restore"), st.sampled_from(SIDS)),
    st.tuples(st.just("begin"),),
    st.tuples(st.just("finish"),),
    st.tuples(st.just("round"),),
)


class Oracle:
    """What each session is owed, kept independently of the engine."""

    def __init__(self) -> None:
        self.next_chunk: dict[str, int] = {}
        self.active: dict[str, bool] = {}
        self.owed: dict[str, int | None] = {}  # None = unbounded


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=60))
def test_every_due_chunk_delivered_exactly_once_in_order(ops):
    eng = make_engine(max_batch=3)
    orc = Oracle()
    delivered: dict[str, list[int]] = {}
    last_delivery_s: dict[str, float] = {}
    now = 0.0
    inflight = None

    def finish(rnd):
        nonlocal now
        now = max(now, rnd.finish_s)
        out = eng.finish_round(rnd, now)
        for d in out.deliveries:
            sid = d.session_id
            assert d.chunk_index == orc.next_chunk[sid], "out of order or duplicated"
            assert read_tag(d.frames) == (session_tag(sid), d.chunk_index)
            assert 0.0 <= d.latency_ms and d.due_s >= last_delivery_s.get(sid, float("-inf"))
            delivered.setdefault(sid, []).append(d.chunk_index)
            last_delivery_s[sid] = now
            orc.next_chunk[sid] += 1
            if orc.active[sid] and orc.owed[sid] is not None:
                orc.owed[sid] -= 1
                if orc.owed[sid] == 0:
                    orc.active[sid] = False
                    assert sid in out.became_idle
        assert not out.failed
        return out

    for o in ops:
        now += 0.01
        kind, *args = o
        if kind == "add":
            sid, active, n, _ = args
            if sid in eng or sid in orc.next_chunk:
                continue  # ids are never reused
            eng.add_session(sid, A if sid != "s4" else B, "p", now, active=active, chunks_wanted=n)
            orc.next_chunk[sid] = 0
            orc.active[sid] = active
            orc.owed[sid] = (n or None) if active else None
        elif kind in ("activate", "pause", "remove", "offload", "restore"):
            sid = args[0]
            if sid not in eng:
                continue
            info = eng.info(sid)
            if kind == "activate":
                eng.activate(sid, now, args[1])
                orc.active[sid] = True
                orc.owed[sid] = args[1] or None
            elif kind == "pause":
                eng.pause(sid, now)
                orc.active[sid] = False
                orc.owed[sid] = None
            elif kind == "remove":
                eng.remove(sid)
            elif kind == "offload" and info.tier is Tier.GPU and not info.in_flight:
                eng.offload(sid)
            elif kind == "restore" and info.tier is Tier.HOST:
                eng.restore(sid, now)
        elif kind == "begin" and inflight is None:
            inflight = eng.begin_round(now)
        elif kind == "finish" and inflight is not None:
            finish(inflight)
            inflight = None
        elif kind == "round" and inflight is None:
            rnd = eng.begin_round(now)
            if rnd is not None:
                finish(rnd)
        # memory accounting is never negative nor over capacity
        assert 0 <= eng.pool.gpu_bytes <= eng.pool.capacity_bytes
        assert eng.pool.host_bytes >= 0 and eng.pool.reserved_bytes >= 0

    if inflight is not None:
        finish(inflight)
    # drain: bring every session back, stop the unbounded ones, run until nothing is due
    for sid in list(eng.table):
        if eng.info(sid).tier is Tier.HOST:
            eng.restore(sid, now)
        if orc.active[sid] and orc.owed[sid] is None:
            eng.pause(sid, now)
            orc.active[sid] = False
    for _ in range(200):
        rnd = eng.begin_round(now)
        if rnd is None:
            break
        finish(rnd)
    assert not eng.has_due_work()
    for sid in eng.table:
        assert not orc.active[sid], f"{sid} still owed {orc.owed[sid]} chunks"
        assert eng.info(sid).chunk_index == orc.next_chunk[sid]
    for sid, idxs in delivered.items():
        assert idxs == list(range(len(idxs)))


def test_chunk_of_a_removed_session_is_dropped_even_if_the_id_returns():
    eng = make_engine()
    eng.add_session("s", A, "p", 0.0)
    rnd = eng.begin_round(0.0)
    eng.remove("s")
    eng.add_session("s", A, "new", 0.5)  # a new session under the same id
    out = eng.finish_round(rnd, rnd.finish_s)
    assert out.session_ids == () and not out.failed
    assert eng.info("s").chunk_index == 0 and run_one(eng, 1.0).chunk_indices == (0,)
