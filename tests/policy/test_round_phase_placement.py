"""Placement counts the placed session's own first chunk: it waits for the round in
progress on its worker, then runs in the next one (DESIGN.md, closed loop step 2)."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest
from policy_fakes import FakeCluster

from turboserve.policy.placement import first_chunk_delay_ms, next_round_wait_ms
from turboserve.policy.registry import get_policy
from turboserve.policy.views import Placement
from turboserve.types import SessionState


def _phased(view, last_round):
    return replace(view, last_round=MappingProxyType(last_round))


def _two_workers():
    c = FakeCluster()
    a, b = c.add_worker(), c.add_worker()
    for _ in range(3):
        c.add_session(a, context=21)
    for _ in range(4):
        c.add_session(b, context=21)
    return c, a, b


def test_next_round_wait_follows_the_worker_phase():
    c, a, b = _two_workers()
    c.add_worker()  # idle: starts at once
    view = c.view()
    now, load = view.now_s, view.workers[a].load_ms
    idle = [w for w in view.workers if w not in (a, b)][0]
    v = _phased(view, {a: (now - 0.010, 50.0), idle: (now - 1.0, 0.0)})
    assert next_round_wait_ms(v, a) == pytest.approx(40.0)  # the recorded round: 50 ms
    # ready after it ended: the round begun then runs a whole cycle first
    assert next_round_wait_ms(v, a, delay_ms=45.0) == pytest.approx(40.0 + load)
    assert next_round_wait_ms(v, idle) == 0.0
    assert next_round_wait_ms(v, b) == 0.0  # no round reported yet: no phase known
    v = _phased(view, {a: (now - 0.050 - 2.5 * load / 1000.0, 50.0)})
    assert next_round_wait_ms(v, a) == pytest.approx(0.5 * load)  # later rounds at the cycle
    v = _phased(view, {a: (now, 50.0)})
    assert next_round_wait_ms(v, a) == 0.0  # a round just ended: the next one takes it


def test_first_chunk_goes_where_the_next_round_starts_soon():
    """The lighter worker `a` has just begun a round: a new session there waits for it,
    then its own round. `b` is heavier but ends its round in 5 ms: the session's first
    chunk comes far sooner there, and b's larger cycle is still below a's wait."""
    c, a, b = _two_workers()
    sid = c.add_session(None)
    view = c.view()
    la, lb = view.workers[a].load_ms, view.workers[b].load_ms
    assert la < lb
    p = get_policy("turboserve-no-autoscale")
    # without phases: plain min-max onto the lighter worker
    assert p.decide(view, p.initial_memory()).placements == (Placement(sid, a),)
    now = view.now_s
    v = _phased(view, {a: (now - 0.001, la), b: (now - (lb - 5.0) / 1000.0, lb)})
    assert p.decide(v, p.initial_memory()).placements == (Placement(sid, b),)
    # the same phases with b's round just begun too: back to the lighter worker
    v = _phased(view, {a: (now - 0.001, la), b: (now - 0.001, lb)})
    assert p.decide(v, p.initial_memory()).placements == (Placement(sid, a),)


def test_resumed_session_waits_for_its_restore_copy():
    c, a, _ = _two_workers()
    new = c.add_session(None)
    resumed = c.add_session(None)
    c.set_session(resumed, chunks_done=10, state=SessionState.QUEUED)
    view = c.view()
    assert first_chunk_delay_ms(view, view.sessions[new]) == 0.0
    link = view.config.link("host")
    sv = view.sessions[resumed]
    assert sv.state_bytes > 0
    want = link.alpha_ms + sv.state_bytes / (link.bandwidth_gbps * 1e9) * 1000.0
    assert first_chunk_delay_ms(view, sv) == pytest.approx(want)
