"""Controller + InProcessTransport + real engines: the closed loop places, migrates,
offloads, resumes, scales out and in, survives a lost worker and refuses bad decisions."""

from __future__ import annotations

from collections import defaultdict

import pytest

from turboserve.cluster.controller import Controller
from turboserve.cluster.inprocess import InProcessTransport
from turboserve.config import TurboConfig
from turboserve.events import (RoundCompleted, SessionActivated, SessionArrived, SessionDeparted,
                               SessionPaused, Tick)
from turboserve.policy.registry import get_policy
from turboserve.policy.views import ClusterView, Decision, Migration, Placement
from turboserve.profile import load_latency_model
from turboserve.types import SessionSpec, SessionState, WorkerState

MODEL = load_latency_model()
SPEC = SessionSpec(model="wan1.3b-320p", frames_per_chunk=12)  # ~2 sessions per GPU at 750 ms
DEMO = SessionSpec(model="demo91")


class Scripted:
    """Least-loaded placement onto READY workers, plus whatever the test queues."""

    name = "scripted"

    def __init__(self, gpus: int = 2):
        self.gpus = gpus
        self.queue: list[Decision] = []
        self.calls = 0

    def initial_gpus(self, config):
        return self.gpus

    def initial_memory(self):
        return None

    def decide(self, view: ClusterView, memory) -> Decision:
        self.calls += 1
        if self.queue:
            return self.queue.pop(0)
        ready = [w for w in view.workers.values() if w.state is WorkerState.READY]
        placements = []
        load = {w.id: w.load_ms for w in ready}
        for sid in view.pending:
            fits = [w for w in ready if w.free_bytes >= view.sessions[sid].state_bytes]
            if fits:
                best = min(fits, key=lambda w: (load[w.id], w.id))
                load[best.id] += 1000.0
                placements.append(Placement(sid, best.id))
        return Decision(placements=tuple(placements))


def make(policy, gpus=4, **over):
    sets = [f"cluster.gpus={gpus}", "cluster.min_gpus=1"] + [f"{k}={v}" for k, v in over.items()]
    cfg = TurboConfig().with_overrides(sets)
    tr = InProcessTransport(MODEL, cfg)
    ctl = Controller(policy, MODEL, cfg, tr, shape=SPEC.model)
    ctl.bootstrap(0.0)
    return ctl, tr


def chunk_log(tr):
    got = defaultdict(list)
    for out in tr.outcomes:
        for sid, idx in zip(out.session_ids, out.chunk_indices):
            got[sid].append(idx)
    return got


def assert_in_order(tr):
    for sid, idxs in chunk_log(tr).items():
        assert idxs == list(range(len(idxs))), f"{sid}: chunks {idxs}"


def advance(ctl, tr, t, dt, steps):
    for _ in range(steps):
        tr.run_until(t + dt, t)
        t += dt
        ctl.on_event(Tick(t))
    return t


def test_turboserve_policy_places_scales_out_and_migrates():
    ctl, tr = make(get_policy("turboserve"), gpus=4)
    assert len(ctl.view().workers) == 1  # autoscaled start
    t = 0.0
    # a burst: all eight land on the one worker up, so the workers the autoscaler starts
    # take load by migration (with arrivals spread out, its trend look-ahead starts them
    # early enough that placement alone spreads the sessions)
    for i in range(8):
        ctl.on_event(SessionArrived(t, f"s{i}", SPEC, "p"))
    t = advance(ctl, tr, t, 2.0, 28)
    view = ctl.view()
    assert not view.pending
    assert len(view.workers) == 4 and all(w.state is WorkerState.READY for w in view.workers.values())
    assert ctl.counters.placements == 8 and ctl.counters.refused == 0
    assert ctl.counters.migrations > 0  # rebalanced onto the workers that came up
    assert ctl.counters.migration_bytes > 0 and ctl.counters.migration_downtime_ms > 0
    assert max(w.load_ms for w in view.workers.values()) <= view.slo_ms(SPEC)
    provisioned = [p for _, p, _ in ctl.worker_samples]
    assert provisioned == sorted(provisioned) and provisioned[-1] == 4
    assert len(ctl.decision_ms) == ctl.counters.decisions > 0
    assert_in_order(tr)
    # the engines agree with the controller about where every session is
    for sid, sv in view.sessions.items():
        assert sid in tr.engines[sv.worker]


def test_pause_offload_resume_continues_the_video():
    ctl, tr = make(get_policy("turboserve"), gpus=2, **{"offload.grace_s": 1.0})
    ctl.on_event(SessionArrived(0.0, "a", SPEC, "p", chunks_wanted=3))
    t = advance(ctl, tr, 0.0, 1.0, 10)  # period ends by itself after 3 chunks -> idle -> offloaded
    sv = ctl.view().sessions["a"]
    assert sv.state is SessionState.OFFLOADED and sv.chunks_done == 3
    assert ctl.counters.offloads == 1
    ctl.on_event(SessionActivated(t, "a", chunks_wanted=2))
    t = advance(ctl, tr, t, 1.0, 10)
    assert ctl.counters.resumes == 1 and ctl.counters.restores == 1
    assert chunk_log(tr)["a"] == [0, 1, 2, 3, 4]


def test_bad_decisions_are_refused_not_applied():
    pol = Scripted(gpus=2)
    ctl, tr = make(pol, gpus=2)
    ctl.on_event(SessionArrived(0.0, "a", SPEC, "p"))  # placed least-loaded on w0
    assert ctl.view().sessions["a"].worker == "w0"
    pol.queue = [Decision(placements=(Placement("a", "w1"),),  # not pending
                          migrations=(Migration("a", "w1", "w0"), Migration("a", "w0", "nope")),
                          offloads=("a",),  # active, not idle
                          prefetches=(Placement("a", "w1"), Placement("x", "w1")),  # resident; unknown
                          scale_out=5)]  # over cluster.gpus
    ctl.on_event(Tick(0.1))
    assert ctl.counters.refused == 7 and len(ctl.refusals) == 7
    assert ctl.view().sessions["a"].worker == "w0" and len(ctl.view().workers) == 2
    # a placement onto a full worker is refused too
    big = SessionSpec(model="wan14b-480p")
    pol.queue = [Decision(placements=(Placement("b", "w0"),)), Decision(placements=(Placement("c", "w0"),)),
                 Decision()]
    ctl.on_event(SessionArrived(0.2, "b", big, "p"))
    ctl.on_event(SessionArrived(0.3, "c", big, "p"))
    ctl.on_event(SessionArrived(0.4, "d", big, "p"))
    assert ctl.view().workers["w0"].free_bytes < ctl.view().sessions["d"].state_bytes
    before = ctl.counters.refused
    pol.queue = [Decision(placements=(Placement("d", "w0"),))]
    ctl.on_event(Tick(0.5))
    assert ctl.counters.refused == before + 1 and ctl.view().sessions["d"].state is SessionState.QUEUED


def test_round_completed_decides_only_on_load_change_or_pending():
    pol = Scripted(gpus=1)
    ctl, tr = make(pol, gpus=1)
    ctl.on_event(SessionArrived(0.0, "a", DEMO, "p"))
    window = MODEL.shape("demo91").window_frames
    tr.run_until(30.0, 0.0)  # context grows to the window, then stays
    calls = pol.calls
    assert ctl.view().sessions["a"].context_frames == window
    ctl.on_event(RoundCompleted(31.0, "w0", ("a",), 100.0))
    assert pol.calls == calls  # nothing pending, load unchanged: no decision
    ctl.on_event(SessionArrived(31.5, "b", DEMO, "p", chunks_wanted=1))
    assert pol.calls == calls + 1
    ctl.on_event(RoundCompleted(32.0, "w0", ("a",), 100.0))
    assert pol.calls == calls + 1
    ctl.on_event(RoundCompleted(32.1, "w0", ("a", "b"), 100.0))
    assert ctl.view().sessions["b"].state is SessionState.IDLE  # its one chunk was delivered
    assert pol.calls == calls + 2  # the worker's load fell by far more than 1%


def test_lost_worker_sessions_are_rebuilt_elsewhere_and_continue():
    pol = Scripted(gpus=2)
    ctl, tr = make(pol, gpus=2)
    ctl.on_event(SessionArrived(0.0, "a", DEMO, "p"))
    ctl.on_event(SessionArrived(0.0, "b", DEMO, "p"))
    tr.run_until(2.0, 0.0)
    wa = ctl.view().sessions["a"].worker
    n_before = len(chunk_log(tr)["a"])
    tr.lose_worker(wa, 2.0)
    view = ctl.view()
    assert wa not in view.workers and ctl.counters.workers_lost == 1
    assert view.sessions["a"].worker != wa and view.sessions["a"].state is SessionState.ACTIVE
    assert ctl.counters.resumes == 1
    tr.run_until(4.0, 2.0)
    got = chunk_log(tr)["a"]
    assert len(got) > n_before and got == list(range(len(got)))


def test_release_drains_then_releases_and_failures_stay_local():
    pol = Scripted(gpus=2)
    ctl, tr = make(pol, gpus=2)
    ctl.on_event(SessionArrived(0.0, "a", DEMO, "p"))
    ctl.on_event(SessionArrived(0.0, "b", DEMO, "p"))
    pol.queue = [Decision(release=("w1",))]
    ctl.on_event(Tick(0.1))
    assert ctl.view().workers["w1"].state is WorkerState.DRAINING  # still holds b
    pol.queue = [Decision(migrations=(Migration("b", "w1", "w0"),))]
    ctl.on_event(Tick(0.2))
    assert "w1" not in ctl.view().workers and "w1" not in tr.engines
    # released when the migration finished (its modelled duration after 0.2 s)
    (rel,) = [c for c in tr.commands if c[0] == "release_worker"]
    assert rel[1] == "w1" and 0.2 < rel[2] < 0.3
    assert ctl.worker_samples[-1] == (rel[2], 1, 1)
    # one session's chunk fails: it ends, the other keeps going
    tr.engines["w0"].executor.inject_failure("a", "nan in latents")
    tr.run_until(1.0, 0.2)
    assert ctl.failed == {"a": "nan in latents"} and "a" not in ctl.view().sessions
    assert "a" not in tr.engines["w0"]
    assert len(chunk_log(tr)["b"]) > 2
    ctl.on_event(SessionDeparted(1.0, "b"))
    assert not ctl.view().sessions and not tr.engines["w0"].table


def test_unknown_shape_fails_only_that_session():
    ctl, tr = make(Scripted(gpus=1), gpus=1)
    ctl.on_event(SessionArrived(0.0, "bad", SessionSpec(model="nosuch"), "p"))
    ctl.on_event(SessionArrived(0.0, "good", DEMO, "p"))
    assert "nosuch" in ctl.failed["bad"]
    assert ctl.view().sessions["good"].state is SessionState.ACTIVE


def test_paused_pending_session_is_not_placed():
    pol = Scripted(gpus=1)
    ctl, tr = make(pol, gpus=1)
    pol.queue = [Decision()]  # the arrival's decision places nothing
    ctl.on_event(SessionArrived(0.0, "a", DEMO, "p"))
    ctl.on_event(SessionPaused(0.1, "a"))
    assert ctl.view().sessions["a"].state is SessionState.OFFLOADED and not ctl.view().pending
    ctl.on_event(SessionActivated(0.2, "a"))
    assert ctl.view().sessions["a"].state is SessionState.ACTIVE
    assert tr.commands[-1][:5] == ("place", "a", "w0", 0.2, False)  # never had state: a new start


class Broken(Scripted):
    def decide(self, view, memory):
        raise RuntimeError("policy bug")


def test_policy_errors_raise_by_default_and_are_counted_when_asked():
    ctl, tr = make(Broken(gpus=1), gpus=1)
    with pytest.raises(RuntimeError, match="policy bug"):
        ctl.on_event(SessionArrived(0.0, "a", DEMO, "p"))
    cfg = TurboConfig().with_overrides(["cluster.gpus=1"])
    tr2 = InProcessTransport(MODEL, cfg)
    live = Controller(Broken(gpus=1), MODEL, cfg, tr2, raise_policy_errors=False)
    live.bootstrap(0.0)
    live.on_event(SessionArrived(0.0, "a", DEMO, "p"))
    live.on_event(Tick(1.0))
    assert live.counters.policy_errors == 2 and live.view().pending == ("a",)


# --- the closed loop under random events: engines and ClusterState agree, chunks in order ---

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from turboserve.engine.session_table import Tier  # noqa: E402

loop_ops = st.lists(st.tuples(st.sampled_from(["arrive", "arrive", "pause", "activate", "depart", "advance",
                                               "advance", "lose", "tick"]),
                              st.integers(0, 30), st.integers(0, 4)), min_size=5, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(loop_ops, st.sampled_from(["turboserve", "static-ll", "migrate-only"]))
def test_closed_loop_keeps_engines_and_views_consistent(ops, policy_name):
    ctl, tr = make(get_policy(policy_name), gpus=3, **{"offload.grace_s": 0.5, "cluster.startup_delay_s": 0.0})
    t = 0.0
    n = 0
    for kind, i, k in ops:
        live = sorted(ctl.view().sessions)
        sid = live[i % len(live)] if live else None
        if kind == "arrive":  # a burst of k+1 sessions
            for _ in range(k + 1):
                ctl.on_event(SessionArrived(t, f"s{n}", DEMO if i % 3 == 0 else SPEC, "p", chunks_wanted=i % 5))
                n += 1
        elif kind == "pause" and sid:
            ctl.on_event(SessionPaused(t, sid))
        elif kind == "activate" and sid:
            ctl.on_event(SessionActivated(t, sid, chunks_wanted=k))
        elif kind == "depart" and sid:
            ctl.on_event(SessionDeparted(t, sid))
        elif kind == "lose" and len(tr.engines) > 1:
            tr.lose_worker(sorted(tr.engines)[i % len(tr.engines)], t)
        elif kind == "tick":
            ctl.on_event(Tick(t))
        tr.run_until(t + 0.5 * (k + 1), t)
        t += 0.5 * (k + 1)
        ctl.on_event(Tick(t))

        view = ctl.view()
        assert set(view.workers) == set(tr.engines)
        for wid, wv in view.workers.items():
            eng = tr.engines[wid]
            resident = {s for s in eng.table if eng.info(s).tier is Tier.GPU}
            assert resident == set(wv.sessions), wid
            assert eng.pool.used_bytes == wv.used_bytes <= wv.memory_bytes
        for s, sv in view.sessions.items():
            if sv.worker is not None:
                info = tr.engines[sv.worker].info(s)
                assert info.active == (sv.state is SessionState.ACTIVE), s
                assert info.chunk_index == sv.chunks_done, s
        assert ctl.counters.refused == 0 or policy_name != "static-ll"
    assert_in_order(tr)


def test_completions_that_change_nothing_make_no_decision():
    """A round that changed nothing the controller holds, and an offload that only freed
    memory, make a decision only if they can matter: the round never (a queued session
    waits for memory or a READY worker, which come with their own events), the offload
    only while a session is queued (the simulator's cruise relies on the first)."""
    pol = Scripted(gpus=1)
    ctl, tr = make(pol, gpus=1)
    wid = next(iter(ctl.view().workers))
    ctl.on_event(SessionArrived(0.0, "a", DEMO, "p"))
    ctl.on_event(SessionArrived(0.0, "b", DEMO, "p"))
    assert ctl.view().sessions["a"].worker == wid
    ctl.on_event(RoundCompleted(1.0, wid, ("a", "b"), 50.0, rounds=30))  # contexts reach the window
    calls = pol.calls
    ctl.on_event(RoundCompleted(1.1, wid, ("a", "b"), 50.0))
    assert pol.calls == calls  # nothing pending, load unchanged

    pol.queue.append(Decision())  # the next arrival stays queued
    ctl.on_event(SessionArrived(1.2, "c", DEMO, "p"))
    assert ctl.view().pending == ("c",) and pol.calls == calls + 1
    ctl.on_event(RoundCompleted(1.3, wid, ("a", "b"), 50.0))
    assert pol.calls == calls + 1  # queued, but the round changed nothing

    # b's period ends: the round changed the worker (b idle), a decision follows
    pol.queue.append(Decision())
    ctl.on_event(SessionPaused(1.4, "b"))
    pol.queue.append(Decision(offloads=("b",)))
    calls = pol.calls
    ctl.on_event(Tick(1.5))
    tr.run_until(3.0, 1.5)  # the offload completes; c is still queued: a decision
    assert ctl.counters.offloads == 1 and pol.calls == calls + 2
    assert ctl.view().sessions["c"].worker == wid  # placed with the memory b freed

    pol.queue.append(Decision())
    ctl.on_event(SessionPaused(3.1, "c"))
    pol.queue.append(Decision(offloads=("c",)))
    calls = pol.calls
    ctl.on_event(Tick(3.2))
    tr.run_until(5.0, 3.2)  # nothing queued: the freed memory makes no decision
    assert ctl.counters.offloads == 2
    assert pol.calls == calls + 1  # the tick's


def test_a_load_change_between_the_extremes_waits_for_the_tick():
    """A context that grows on a worker neither the heaviest nor the lightest changes no
    rebalancing (moves go from the bottleneck to the lightest) and no scaling (demand
    counts sessions): the round makes no decision; the next tick sees it. A rise at the
    top decides at once."""
    pol = Scripted(gpus=3)
    ctl, tr = make(pol, gpus=3)
    w0, w1, w2 = sorted(ctl.view().workers)
    for sid, wid in (("a", w0), ("b", w0), ("c", w0), ("d", w1), ("e", w1), ("f", w2)):
        pol.queue.append(Decision(placements=(Placement(sid, wid),)))
        ctl.on_event(SessionArrived(0.0, sid, DEMO, "p"))
    assert {s: v.worker for s, v in ctl.view().sessions.items()} == {
        "a": w0, "b": w0, "c": w0, "d": w1, "e": w1, "f": w2}
    calls = pol.calls
    ctl.on_event(RoundCompleted(1.0, w0, ("a", "b", "c"), 50.0, rounds=30))  # the bottleneck grows
    assert pol.calls == calls + 1
    before = ctl.view().workers[w1].load_ms
    ctl.on_event(RoundCompleted(1.1, w1, ("d", "e"), 50.0, rounds=2))
    after = ctl.view().workers[w1].load_ms
    assert after > 1.01 * before  # it moved enough to decide, were it at an extreme
    loads = {w: v.load_ms for w, v in ctl.view().workers.items()}
    assert loads[w2] < after < loads[w0]
    assert pol.calls == calls + 1
    ctl.on_event(Tick(1.2))
    assert pol.calls == calls + 2
    ctl.on_event(RoundCompleted(1.3, w2, ("f",), 50.0, rounds=2))  # the lightest grows: a worse
    assert pol.calls == calls + 2  # destination than it was, no move can come of it
    ctl.on_event(RoundCompleted(1.4, w0, ("a", "b", "c"), 50.0, rounds=1))
    assert pol.calls == calls + 2  # at the window already: the load did not move
