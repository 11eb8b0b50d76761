"""TurboServe's scale-out look-ahead: the rise it projects is fitted over a recent window
(`autoscale.rise_window_s`), so a burst out of a flat spell raises the target at once; a
rise that did not come true holds no GPUs after the scale-in hold (`hold_counts_rise`)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from policy_fakes import FakeCluster

from turboserve.config import AutoscaleConfig, TurboConfig
from turboserve.policy.autoscale import ScaleTimers, lookahead_rise, turboserve_scale
from turboserve.policy.demand import DemandWindow, scan_cluster
from turboserve.policy.turboserve import LazyOrder
from turboserve.policy.whatif import ModelCache, WhatIf


def _burst_window():
    """Flat demand of 1 GPU for 90 s, then +0.05 GPU/s for 30 s (now = 120 s)."""
    w = DemandWindow()
    for t in range(0, 121, 2):
        d = 1.0 if t <= 90 else 1.0 + 0.05 * (t - 90)
        w = w.observe(float(t), d, 120.0)
    return w, 120.0, 2.5


def test_rise_is_fitted_over_the_recent_window():
    w, now, d = _burst_window()
    a = AutoscaleConfig()
    assert a.rise_window_s == 30.0 and a.lookahead_s == 120.0
    recent = lookahead_rise(a, w, now, d)
    whole = lookahead_rise(replace(a, rise_window_s=0.0), w, now, d)  # over lookahead_s
    z = a.rise_confidence_z
    assert recent == pytest.approx(w.rise_per_s(now, d, 30.0, z))
    assert whole == pytest.approx(w.rise_per_s(now, d, 120.0, z))
    # the onset is not averaged away by the flat spell: over a start-up delay's worth of
    # look-ahead it is worth at least one more GPU than the whole-span fit projects
    assert (recent - whole) * a.lookahead_s >= 1.0
    assert lookahead_rise(replace(a, lookahead_s=0.0), w, now, d) == 0.0


def test_a_burst_is_seen_within_a_third_of_a_start_up_delay():
    """Flat demand of 1 GPU for 100 s, then +0.2 GPU/s for 20 s. With 60 s start-up delays
    the GPUs a burst needs must be started within its first seconds: the default fit
    projects at least half the burst's true rise over the look-ahead (a 60 s window, whose
    flat samples dilute the onset, projected about a quarter of it, and the synthetic
    16-64 GPU traces missed their SLO on the first burst)."""
    w = DemandWindow()
    for t in range(0, 121, 2):
        w = w.observe(float(t), 1.0 if t <= 100 else 1.0 + 0.2 * (t - 100), 120.0)
    a = AutoscaleConfig()
    projected = lookahead_rise(a, w, 120.0, 5.0) * a.lookahead_s
    assert projected >= 0.5 * 0.2 * a.lookahead_s


def _steps_window(steps: list[tuple[float, float]]):
    """Demand of 1 GPU, stepped up by (at time s, GPUs) steps; samples every 2 s to 120 s."""
    w = DemandWindow()
    for t in range(0, 121, 2):
        w = w.observe(float(t), 1.0 + sum(g for at, g in steps if t >= at), 120.0)
    return w


def test_a_couple_of_arrivals_is_not_projected_as_a_ramp():
    """Two sessions of half a GPU arriving 10 s apart (wan1.3b-320p) fit a slope that the
    confidence discount alone lets through: projected over the look-ahead it was worth two
    GPUs and more. Less two sessions' worth per rise window, nothing is projected."""
    w = _steps_window([(100.0, 0.5), (110.0, 0.5)])
    a = AutoscaleConfig()
    assert a.rise_min_sessions == 2.0
    bare = lookahead_rise(replace(a, rise_min_sessions=0.0), w, 120.0, 2.0, 0.5)
    assert bare * a.lookahead_s >= 1.0  # what the spikes were
    assert lookahead_rise(a, w, 120.0, 2.0, 0.5) == 0.0


def test_a_ramp_of_many_sessions_keeps_its_projection_less_two_sessions():
    """demo91-sized sessions (1/22 GPU): a burst's rise is many sessions per window, and
    the discount takes exactly two sessions' worth per window from its slope."""
    w, now, d = _burst_window()
    a = AutoscaleConfig()
    share = 1.0 / 22.0
    bare = lookahead_rise(replace(a, rise_min_sessions=0.0), w, now, d, share)
    kept = lookahead_rise(a, w, now, d, share)
    assert kept == pytest.approx(bare - 2.0 * share / a.rise_window_s)
    assert kept * a.lookahead_s >= 0.9 * bare * a.lookahead_s  # most of the ramp is kept


def _hold_release(hold_counts_rise: bool) -> int:
    """Five GPUs up, one GPU of demand. A rise projecting two more GPUs is seen as the hold
    starts and never comes true; GPUs left up once the hold runs out."""
    c = TurboConfig()
    c = replace(c, cluster=replace(c.cluster, gpus=8, min_gpus=1, startup_delay_s=60.0),
                autoscale=replace(c.autoscale, target_util=1.0, headroom_k=0.0, spare_gpus=0.0,
                                  spare_fraction=0.0, lookahead_s=60.0, scale_in_hold_s=100.0,
                                  hold_counts_rise=hold_counts_rise))
    cluster = FakeCluster(config=c)
    ws = [cluster.add_worker() for _ in range(5)]
    for _ in range(cluster.model.capacity("fake", 750.0, 4)):
        cluster.add_session(ws[0], context=21)
    timers = ScaleTimers()
    for now_s, rise_per_s in ((0.0, 2.0 / 60.0), (30.0, 2.0 / 60.0), (120.0, 0.0)):
        cluster.advance(now_s)
        view = cluster.view()
        cache = ModelCache(cluster.model, 32)
        scan = scan_cluster(view, cache)
        order = LazyOrder(view, WhatIf(view, cache), scan.index)
        step, timers = turboserve_scale(view, scan, order, 0.0, timers, starved=False, protected=set(),
                                        consolidate=True, rise_per_s=rise_per_s)
        assert not step.scale_out
    return 5 - len(step.release)


def test_the_hold_releases_what_a_rise_that_did_not_come_true_asked_for():
    assert _hold_release(hold_counts_rise=False) == 1
    assert _hold_release(hold_counts_rise=True) == 3
