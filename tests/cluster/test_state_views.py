"""ClusterState: the incrementally kept views equal a brute-force recomputation after
random sequences of changes."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turboserve.config import TurboConfig
from turboserve.cluster.state import ClusterState, StateError
from turboserve.policy.load import cycle_ms
from turboserve.profile import load_latency_model
from turboserve.policy.views import SessionView, spec_slo_ms
from turboserve.types import SessionSpec, SessionState, WorkerState

MODEL = load_latency_model()
CFG = TurboConfig()
# the last two share a CompatKey but not an SLO (the chunk's playback time)
SPECS = [SessionSpec(model="demo91"), SessionSpec(model="demo91", steps=2),
         SessionSpec(model="wan1.3b-320p", frames_per_chunk=12), SessionSpec(model="wan1.3b-320p", frames_per_chunk=12, fps=8.0)]
FULL = {s.model: MODEL.state_bytes(s.model, MODEL.shape(s.model).window_frames) for s in SPECS}
MEM = 3 * FULL["wan1.3b-320p"]


class Truth:
    """Primary facts, kept by the test; everything else is recomputed from them."""

    def __init__(self):
        self.s: dict[str, dict] = {}
        self.w: dict[str, dict] = {}
        self.pending: list[str] = []

    def expected_views(self):
        workers = {}
        for wid, w in self.w.items():
            members = {sid for sid, s in self.s.items() if s["worker"] == wid or s["mig"] == wid}
            used = sum(FULL[self.s[sid]["spec"].model] for sid in members)
            groups: dict = {}
            for sid in members:
                s = self.s[sid]
                if s["worker"] == wid and s["active"] and not s["off"]:
                    b, c = groups.get(s["spec"].compat_key, (0, 0.0))
                    groups[s["spec"].compat_key] = (b + 1, c + ctx(s))
            workers[wid] = (w["state"], members, used, groups)
        return workers


def ctx(s):
    return float(MODEL.context_after(s["spec"].model, s["chunks"]))


KINDS = (["add"] * 3 + ["place"] * 4 + ["activate", "pause", "offload", "end_off", "remove", "prefetch"] +
         ["round"] * 4 + ["migrate"] * 2 + ["end_mig"] * 2 + ["add_worker", "ready", "lose", "drain"])
ops = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 50), st.integers(0, 50),
                         st.integers(0, 3), st.booleans()), min_size=20, max_size=80)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_incremental_views_equal_brute_force(seq):
    cs = ClusterState(MODEL, CFG)
    t = Truth()
    now = 0.0
    next_s = next_w = 0
    for kind, i, j, n, flag in seq:
        now += 0.5
        live_s = sorted(t.s)
        live_w = sorted(t.w)
        if kind == "add":
            sid, next_s = f"s{next_s}", next_s + 1
        else:
            sid = live_s[i % len(live_s)] if live_s else "none"
        if kind == "add_worker":
            wid, next_w = f"w{next_w}", next_w + 1
        else:
            wid = live_w[j % len(live_w)] if live_w else "none"
        s = t.s.get(sid)
        w = t.w.get(wid)
        if kind == "add_worker" and w is None:
            cs.add_worker(wid, now, MEM, ready=flag)
            t.w[wid] = {"state": WorkerState.READY if flag else WorkerState.STARTING}
        elif kind == "ready" and w is not None and w["state"] is WorkerState.STARTING:
            cs.set_worker_state(wid, WorkerState.READY, now)
            w["state"] = WorkerState.READY
        elif kind == "drain" and w is not None:
            members = [x for x, v in t.s.items() if v["worker"] == wid or v["mig"] == wid]
            if members:
                cs.set_worker_state(wid, WorkerState.DRAINING, now)
                w["state"] = WorkerState.DRAINING
            else:
                cs.remove_worker(wid)
                del t.w[wid]
        elif kind == "lose" and w is not None:
            lost, cancelled = cs.lose_worker(wid, now)
            for x, v in sorted(t.s.items()):  # lost sessions queue up in id order
                if v["mig"] == wid:
                    v["mig"] = None
                    assert x in cancelled
                elif v["worker"] == wid:
                    assert x in lost
                    if v["mig"] is not None:
                        v["mig"] = None
                    v["worker"] = None
                    v["off"] = False
                    if v["active"]:
                        v["pending"] = True
                        t.pending.append(x)
            del t.w[wid]
        elif kind == "add" and s is None:
            spec = SPECS[n % len(SPECS)]
            cs.add_session(sid, spec, "p", now, chunks_wanted=n if flag else 0)
            t.s[sid] = {"spec": spec, "worker": None, "active": True, "pending": True, "mig": None,
                        "off": False, "chunks": 0, "left": (n or None) if flag else None,
                        "placed": False, "host": False}
            t.pending.append(sid)
        elif s is None:
            continue
        elif kind == "place" and s["pending"] and w is not None:
            if cs.fits(sid, wid):
                cs.place(sid, wid, now)
                s.update(worker=wid, pending=False, placed=True)
                t.pending.remove(sid)
        elif kind == "activate":
            what = cs.activate(sid, now, n)
            s["left"] = n or None
            if not s["active"]:
                s.update(active=True, host=False)
                if s["worker"] is None:
                    s["pending"] = True
                    t.pending.append(sid)
                    assert what == "pending"
        elif kind == "pause" and s["active"]:
            cs.pause(sid, now)
            s.update(active=False, left=None)
            if s["pending"]:
                s["pending"] = False
                t.pending.remove(sid)
                s["host"] = s["placed"]  # its state stayed in host memory
        elif kind == "prefetch" and w is not None:
            if not s["active"] and not s["pending"] and s["worker"] is None and s["placed"]:
                cs.prefetch(sid, wid, now)
                s.update(worker=wid, host=False)
            else:
                with pytest.raises(StateError):
                    cs.prefetch(sid, wid, now)
        elif kind == "round" and s["worker"] is not None and not s["off"]:
            # a worker's round reports every session it ran; here one at a time, n+1 rounds
            cs.round_completed(s["worker"], [sid], now, rounds=n + 1)
            s["chunks"] += n + 1
            if s["active"] and s["left"] is not None:
                s["left"] -= n + 1
                if s["left"] <= 0:
                    s.update(active=False, left=None)
        elif kind == "migrate" and s["worker"] is not None and s["mig"] is None and not s["off"] \
                and w is not None and wid != s["worker"]:
            cs.begin_migration(sid, wid, now)
            s["mig"] = wid
        elif kind == "end_mig" and s["mig"] is not None:
            assert cs.end_migration(sid, flag, now)
            if flag:
                s["worker"] = s["mig"]
            s["mig"] = None
        elif kind == "offload":
            if s["worker"] is not None and not s["active"] and s["mig"] is None and not s["off"]:
                cs.begin_offload(sid, now)
                s["off"] = True
            else:
                with pytest.raises(StateError):
                    cs.begin_offload(sid, now)
        elif kind == "end_off" and s["off"]:
            assert cs.end_offload(sid, now)
            s.update(off=False, worker=None, host=not s["active"])
            if s["active"]:
                s["pending"] = True
                t.pending.append(sid)
        elif kind == "remove":
            cs.remove_session(sid)
            del t.s[sid]
            if sid in t.pending:
                t.pending.remove(sid)

        # ---- compare with the brute-force recomputation
        view = cs.view(now)
        assert list(view.pending) == t.pending
        assert set(view.sessions) == set(t.s)
        for x, v in t.s.items():
            sv = view.sessions[x]
            want = (SessionState.MIGRATING if v["mig"] else
                    (SessionState.ACTIVE if v["active"] else SessionState.IDLE) if v["worker"] else
                    SessionState.QUEUED if v["pending"] else SessionState.OFFLOADED)
            assert sv.state is want, x
            assert sv.worker == v["worker"] and sv.chunks_done == v["chunks"]
            assert sv.context_frames == ctx(v) and sv.state_bytes == FULL[v["spec"].model]
        idle = {x for x, v in t.s.items() if v["worker"] and not v["active"] and not v["off"] and not v["mig"]}
        assert set(view.idle_resident) == idle
        offloaded = {}
        for x, v in t.s.items():
            if v["host"]:
                offloaded.setdefault(v["spec"].compat_key, set()).add(x)
        assert {k: set(m) for k, m in view.idle_offloaded.items()} == offloaded
        for m in view.idle_offloaded.values():
            assert list(m.values()) == sorted(m.values())  # oldest first
        kinds = Counter((v["spec"].compat_key, spec_slo_ms(CFG, v["spec"])) for v in t.s.values())
        assert dict(view.slo_groups) == kinds
        expected = t.expected_views()
        assert set(view.workers) == set(expected)
        for x, (state, members, used, groups) in expected.items():
            wv = view.workers[x]
            assert wv.state is state and wv.sessions == members and wv.used_bytes == used
            got = {g.key: (g.batch, g.context_sum) for g in wv.groups}
            assert set(got) == set(groups)
            for k, (b, c) in groups.items():
                assert got[k][0] == b and math.isclose(got[k][1], c, abs_tol=1e-6)
            assert math.isclose(wv.load_ms, cycle_ms(wv.groups, MODEL, CFG.engine.max_batch), rel_tol=1e-9)
            assert used <= MEM or True  # fits is the controller's check; state only counts


def test_view_is_constant_time_and_read_only():
    cs = ClusterState(MODEL, CFG)
    cs.add_worker("w0", 0.0, MEM, ready=True)
    cs.add_session("a", SPECS[0], "p", 0.0)
    v = cs.view(1.0)
    with pytest.raises(TypeError):
        v.sessions["b"] = None  # type: ignore[index]
    assert v.pending == ("a",) and cs.view(2.0).pending is v.pending  # cached tuple
    cs.place("a", "w0", 1.0)
    assert cs.view(2.0).workers["w0"].load_ms > 0 and v.workers["w0"].sessions == {"a"}


def test_unknown_shape_is_refused_by_name():
    cs = ClusterState(MODEL, CFG)
    with pytest.raises(StateError, match="no shape 'nosuch'"):
        cs.add_session("a", SessionSpec(model="nosuch"), "p", 0.0)


def _as_constructed(sv: SessionView) -> SessionView:
    """The same record built by the dataclass's own constructor."""
    return SessionView(*(getattr(sv, f.name) for f in dataclasses.fields(SessionView)))


def test_views_read_late_equal_views_read_after_every_change():
    """Round completions rebuild session records only when read: reading them late (through
    get, [], session(), values()) gives what reading after every change gives."""
    eager, lazy = ClusterState(MODEL, CFG), ClusterState(MODEL, CFG)
    sids = [f"s{i}" for i in range(6)]
    for cs in (eager, lazy):
        cs.add_worker("w0", 0.0, MEM, ready=True)
        for i, sid in enumerate(sids):
            cs.add_session(sid, SPECS[0], "p", 0.0, chunks_wanted=7 if i == 0 else 0)
            if i < 5:
                cs.place(sid, "w0", 0.0)
    now = 0.0
    done = dict.fromkeys(sids, 0)
    for step in range(12):
        now += 0.25
        ran = sids[: 5 - step % 3]
        for cs in (eager, lazy):
            cs.round_completed("w0", ran, now, rounds=1 + step % 2)
        for sid in ran:
            done[sid] += 1 + step % 2
        seen = eager.view(now).sessions
        for sid in sids:
            assert seen[sid].chunks_done == done[sid]
            assert seen[sid].context_frames == MODEL.context_after("demo91", done[sid])
        if step == 6:
            for cs in (eager, lazy):
                cs.remove_session("s4")
            sids.remove("s4")
    late = lazy.view(now)
    for sid in sids:
        want = eager.session(sid)
        assert late.sessions.get(sid) == want == _as_constructed(want)
        assert want.chunks_done == done[sid]
        assert late.sessions[sid] == lazy.session(sid) == want
        assert hash(late.sessions[sid]) == hash(_as_constructed(want))
    assert list(late.sessions.values()) == [eager.session(s) for s in late.sessions]
    assert late.sessions.get("s4") is None and "s4" not in late.sessions
    assert lazy.session("s0").state is SessionState.IDLE  # its 7 chunks were delivered
    assert lazy.view(now).workers["w0"] == eager.view(now).workers["w0"]


def test_round_completion_records_the_worker_phase():
    """The view carries each worker's latest round completion and the predicted duration of
    the round that began then (placement reads the phase from it); a removed worker's goes."""
    cs = ClusterState(MODEL, CFG)
    cs.add_worker("w0", 0.0, MEM, ready=True)
    cs.add_worker("w1", 0.0, MEM, ready=True)
    cs.add_session("a", SPECS[0], "p", 0.0)
    cs.place("a", "w0", 0.0)
    assert dict(cs.view(0.5).last_round) == {}
    cs.round_completed("w0", ["a"], 1.25)
    v = cs.view(1.3)
    assert v.last_round["w0"] == (1.25, v.workers["w0"].load_ms) and "w1" not in v.last_round
    cs.round_completed("w1", [], 2.0)
    assert cs.view(2.0).last_round["w1"] == (2.0, 0.0)
    cs.remove_worker("w1")
    assert "w1" not in cs.view(2.0).last_round
    with pytest.raises(TypeError):
        cs.view(2.0).last_round["w0"] = (0.0, 0.0)  # type: ignore[index]


def test_the_phase_hook_runs_before_a_phase_is_read_and_before_a_load_changes():
    """A simulator running rounds in bulk reports a worker's rounds from this hook: it must
    run before placement reads the worker's phase and before the worker's load changes,
    so the phase is recorded with the load the rounds ran with."""
    cs = ClusterState(MODEL, CFG)
    cs.add_worker("w0", 0.0, MEM, ready=True)
    cs.add_session("a", SPECS[0], "p", 0.0)
    cs.place("a", "w0", 0.0)
    load_a = cs.view(0.0).workers["w0"].load_ms
    seen = []

    after_round = []

    def hook(wid):
        seen.append((wid, cs.view(1.0).workers[wid].load_ms))
        if len(seen) == 1:  # the bulk-run round is reported before the load changes
            cs.round_completed(wid, ["a"], 0.9)
            after_round.append(cs.view(1.0).workers[wid].load_ms)  # a's context grew

    cs.set_phase_hook(hook)
    cs.add_session("b", SPECS[0], "p", 1.0)
    cs.place("b", "w0", 1.0)  # b joins w0's load: the hook runs first, with a alone
    assert seen[0] == ("w0", load_a)
    # the phase holds the load of the round begun at 0.9 (a alone), not a and b's
    assert cs.view(1.0).last_round["w0"] == (0.9, after_round[0])  # a read runs the hook too
    assert len(seen) == 2 and cs.view(1.0).workers["w0"].load_ms > after_round[0]
    cs.set_phase_hook(None)
    cs.view(1.0).last_round.get("w0")
    assert len(seen) == 2


def test_a_read_hook_may_move_only_the_phase():
    """A simulator whose bulk-run rounds changed nothing the controller holds moves only a
    worker's phase before a read (`note_round_completion`): the entry is the one
    `round_completed` would record, and the sessions' counts wait for the bulk report."""
    cs = ClusterState(MODEL, CFG)
    cs.add_worker("w0", 0.0, MEM, ready=True)
    cs.add_session("a", SPECS[0], "p", 0.0)
    cs.place("a", "w0", 0.0)
    cs.round_completed("w0", ["a"], 0.5, rounds=40)  # context at the window
    twin = ClusterState(MODEL, CFG)
    twin.add_worker("w0", 0.0, MEM, ready=True)
    twin.add_session("a", SPECS[0], "p", 0.0)
    twin.place("a", "w0", 0.0)
    twin.round_completed("w0", ["a"], 0.5, rounds=40)
    twin.round_completed("w0", ["a"], 0.7)

    reads = []
    cs.set_phase_hook(lambda wid: pytest.fail("a read must not call the change hook"),
                      before_read=lambda wid: (reads.append(wid), cs.note_round_completion(wid, 0.7)))
    assert cs.view(1.0).last_round.get("w0") == twin.view(1.0).last_round["w0"]
    assert reads == ["w0"]
    assert cs.view(1.0).sessions["a"].chunks_done == 40  # told later, in bulk
    cs.note_round_completion("gone", 1.0)  # a worker no longer there: nothing to move
    assert "gone" not in cs.view(1.0).last_round


def test_idle_sessions_in_host_memory_are_listed_until_they_resume_or_go_back_to_a_gpu():
    cs = ClusterState(MODEL, CFG)
    spec = SPECS[2]
    key = spec.compat_key
    cs.add_worker("w0", 0.0, MEM, ready=True)
    cs.add_worker("w1", 0.0, MEM, ready=True)
    for sid in ("a", "b"):
        cs.add_session(sid, spec, "p", 0.0)
        cs.place(sid, "w0", 0.0)
        cs.pause(sid, 1.0)
    with pytest.raises(StateError):
        cs.prefetch("a", "w1", 1.5)  # still on its GPU
    for sid, t in (("b", 2.0), ("a", 3.0)):
        cs.begin_offload(sid, t)
        cs.end_offload(sid, t)
    view = cs.view(3.0)
    assert list(view.idle_offloaded[key].items()) == [("b", 2.0), ("a", 3.0)]  # oldest first
    assert view.workers["w0"].used_bytes == 0

    cs.prefetch("a", "w1", 4.0)
    view = cs.view(4.0)
    assert list(view.idle_offloaded[key]) == ["b"]
    assert view.sessions["a"].state is SessionState.IDLE and view.sessions["a"].worker == "w1"
    assert view.idle_resident == {"a": 4.0} and view.workers["w1"].used_bytes == FULL[spec.model]
    assert view.workers["w1"].groups == ()  # idle: no load

    assert cs.activate("b", 5.0) == "pending"  # resuming: placed like a new session, not listed
    assert key not in cs.view(5.0).idle_offloaded
    cs.pause("b", 6.0)  # paused again before it got a GPU: its state is still in host memory
    assert list(cs.view(6.0).idle_offloaded[key]) == ["b"]
    with pytest.raises(StateError):
        cs.prefetch("a", "w0", 7.0)  # on a GPU already
    cs.remove_session("b")
    assert cs.view(7.0).idle_offloaded == {}
