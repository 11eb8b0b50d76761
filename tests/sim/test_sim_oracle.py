"""Oracle bounds on hand-made traces with a fake latency model (pure arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest

from turboserve.policy.latency import ShapeInfo
from turboserve.sim.oracle import (cost_lower_bound_gpu_hours, latency_floor_ms, latency_lower_bound_ms,
                                   nominal_demand, throughput_lower_bound_gpu_hours)
from turboserve.types import Period, SessionRecord, SessionSpec


class FakeModel:
    """Round of b sessions = 50 + 10*b ms (context-free); capacity from that and the SLO."""

    def shape(self, name):
        return ShapeInfo(name, 1, 4, 16.0, 8, 5, weights_bytes=10, gpu_memory_bytes=10**6)

    def round_ms(self, shape, batch, context_frames, steps):
        return 50.0 + 10.0 * batch

    def fixed_ms(self, shape):
        return 0.0

    def state_bytes(self, shape, context_frames):
        return 1000

    def activation_bytes(self, shape, batch):
        return 0

    def context_after(self, shape, chunks_done):
        return min(chunks_done, 8)

    def capacity(self, shape, slo_ms, steps):
        b = 0
        while self.round_ms(shape, b + 1, 8, steps) <= slo_ms:
            b += 1
        return b


SPEC = SessionSpec(model="fake", fps=16.0, frames_per_chunk=4)  # 250 ms chunks


def rec(i, arrival_s, *periods):
    return SessionRecord(f"s{i}", arrival_s, SPEC, tuple(Period(a, b) for a, b in periods))


def test_cost_bound_integrates_ceil_of_active_over_capacity():
    model = FakeModel()
    assert model.capacity("fake", 250.0, 4) == 20
    # 30 sessions active 0..100 s (2 GPUs), then 10 of them 100..200 s (1 GPU)
    records = [rec(i, 0.0, (100.0, 0.0)) for i in range(20)] + [rec(20 + i, 0.0, (200.0, 0.0)) for i in range(10)]
    demand = nominal_demand(records)
    key = SPEC.compat_key
    lb = cost_lower_bound_gpu_hours(demand, model, {key: 250.0}, gpu_memory_bytes=10**6)
    assert lb == pytest.approx((2 * 100 + 1 * 100) / 3600.0)
    # the schedule-free bound is never above the time-integral one here
    assert throughput_lower_bound_gpu_hours(records, model, {key: 250.0}, 10**6) <= lb + 1e-12


def test_an_slo_above_playback_paces_the_nominal_schedule():
    records = [rec(0, 10.0, (0.9, 5.0), (1.0, 0.0))]  # 4 chunks, idle 5 s, 4 chunks
    d = nominal_demand(records, {SPEC.compat_key: 500.0})[SPEC.compat_key]  # 2x playback
    assert list(d.starts_s) == [10.0, 17.0] and list(d.ends_s) == [12.0, 19.0]
    assert d.chunk_period_s == 0.5
    same = nominal_demand(records, {SPEC.compat_key: 100.0})[SPEC.compat_key]  # below: playback
    assert list(same.ends_s) == [11.0, 17.0]


def test_idle_gaps_shape_the_nominal_schedule():
    records = [rec(0, 10.0, (0.9, 5.0), (1.0, 0.0))]  # 4 chunks, idle 5 s, 4 chunks
    d = nominal_demand(records)[SPEC.compat_key]
    assert list(d.starts_s) == [10.0, 16.0]  # 4 chunks x 0.25 s, then 5 s idle
    assert list(d.ends_s) == [11.0, 17.0]
    assert list(d.chunks_before) == [0, 4]
    assert d.active_at(np.array([10.5, 13.0, 16.5, 17.0])).tolist() == [1, 0, 1, 0]


def test_memory_caps_capacity_and_infeasible_shape_raises():
    model = FakeModel()
    records = [rec(i, 0.0, (36.0, 0.0)) for i in range(3)]
    demand = nominal_demand(records)
    key = SPEC.compat_key
    # 1510 bytes of GPU memory (less 10 of weights) hold one 1000-byte session per GPU
    lb = cost_lower_bound_gpu_hours(demand, model, {key: 250.0}, gpu_memory_bytes=1510)
    assert lb == pytest.approx(3 * 36.0 / 3600.0)
    with pytest.raises(ValueError, match="SLO"):
        cost_lower_bound_gpu_hours(demand, model, {key: 55.0}, gpu_memory_bytes=10**6)


def test_latency_bound_balances_over_ready_gpus():
    model = FakeModel()
    records = [rec(i, 0.0, (100.0, 0.0)) for i in range(30)]
    demand = nominal_demand(records)
    # 4 ready GPUs -> ceil(30/4) = 8 per GPU -> 130 ms; with 1 GPU from 50 s: 30 -> 350 ms
    assert latency_lower_bound_ms(demand, model, np.array([0.0]), np.array([4])) == pytest.approx(130.0)
    assert latency_lower_bound_ms(demand, model, np.array([0.0, 50.0]), np.array([4, 1])) == pytest.approx(350.0)


class ContextModel(FakeModel):
    """Round of b sessions at mean context c = 50 + 10*b + 5*c ms, 2 ms fixed per chunk."""

    def round_ms(self, shape, batch, context_frames, steps):
        return 50.0 + 10.0 * batch + 5.0 * context_frames

    def fixed_ms(self, shape):
        return 2.0


def test_latency_floor_is_the_slowest_last_chunk_alone():
    model = ContextModel()
    # 4 chunks (3 done before the last: context 3), and 40 chunks (context saturates at 8)
    short = [rec(0, 0.0, (1.0, 0.0))]
    assert latency_floor_ms(short, model) == pytest.approx(50 + 10 + 5 * 3 + 2)
    long = short + [rec(1, 5.0, (5.0, 3.0), (5.0, 0.0))]
    assert latency_floor_ms(long, model) == pytest.approx(50 + 10 + 5 * 8 + 2)
    assert latency_floor_ms([], model) == 0.0
