"""TurboServe's scale-out look-ahead: the rise it projects is fitted over a recent window
(`autoscale.rise_window_s`), so a burst out of a flat spell raises the target at once."""

from __future__ import annotations

from dataclasses import replace

import pytest

from turboserve.config import AutoscaleConfig
from turboserve.policy.autoscale import lookahead_rise
from turboserve.policy.demand import DemandWindow


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
