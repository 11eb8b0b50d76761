"""Metrics, report and event-loop units: weighted quantiles, GPU-hour integration, JSON keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from turboserve.sim.loop import EventLoop
from turboserve.sim.metrics import Prices, RunMetrics, weighted_quantile
from turboserve.sim.report import REQUIRED_METRICS, build_report, format_table, run_entry, write_json


def test_weighted_quantile_matches_expanded_array():
    rng = np.random.default_rng(1)
    vals = rng.uniform(0, 500, 200)
    counts = rng.integers(1, 20, 200).astype(float)
    expanded = np.repeat(vals, counts.astype(int))
    expanded.sort()
    for q in (0.5, 0.9, 0.99, 0.999, 1.0):
        rank = int(np.ceil(q * expanded.size))
        assert weighted_quantile(vals, counts, q) == expanded[rank - 1]


def test_summary_latency_attainment_stall_and_jitter():
    m = RunMetrics(slo_ms=250.0, playback_ms=250.0)
    m.record_chunks(100.0, 98)
    m.record_chunks(300.0, 2)  # late by 50 ms each
    m.record_intervals(100.0, 3)
    m.record_intervals(300.0, 1)
    s = m.summary(end_s=10.0)
    assert s["chunks"] == 100
    assert s["max_chunk_latency_ms"] == 300.0
    assert s["p50_chunk_latency_ms"] == 100.0
    assert s["p99_chunk_latency_ms"] == 300.0
    assert s["slo_attainment"] == pytest.approx(0.98)
    assert s["stall_s"] == pytest.approx(0.1)
    # intervals 100,100,100,300: mean 150, std sqrt((3*2500 + 22500)/4) = sqrt(7500)
    assert s["jitter_ms"] == pytest.approx(np.sqrt(7500.0))


def test_unfinished_chunks_count_as_misses():
    m = RunMetrics(slo_ms=250.0, playback_ms=250.0)
    m.record_chunks(100.0, 9)
    m.record_unfinished(5000.0, 1)
    s = m.summary(end_s=10.0)
    assert s["slo_attainment"] == pytest.approx(0.9)
    assert s["unfinished_chunks"] == 1
    assert s["max_chunk_latency_ms"] == 5000.0


def test_gpu_hours_integrates_provisioned_workers_and_prices():
    m = RunMetrics(slo_ms=100.0, playback_ms=100.0, prices=Prices(2.0, 1.0, spot_fraction=0.5))
    m.gpus_changed(0.0, 2, 0)  # two starting: billed
    m.gpus_changed(60.0, 2, 2)
    m.gpus_changed(1800.0, 4, 2)
    m.gpus_changed(3600.0, 0, 0)
    s = m.summary(end_s=3600.0)
    # 2 GPUs for 1800 s + 4 GPUs for 1800 s = 3 GPU-hours
    assert s["gpu_hours"] == pytest.approx(3.0)
    assert s["gpus_max"] == 4
    assert s["gpus_mean"] == pytest.approx(3.0)
    assert s["cost_usd"] == pytest.approx(3.0 * 1.5)


def test_report_json_has_exactly_the_required_keys(tmp_path):
    m = RunMetrics(slo_ms=250.0, playback_ms=250.0)
    m.record_chunks(120.0, 10)
    m.gpus_changed(0.0, 1, 1)
    m.set_decision_times([0.1, 0.2, 0.3])
    report = build_report([run_entry("static-rr", m.summary(100.0))], gpu_hours_lb=0.01, latency_lb_ms=90.0)
    path = tmp_path / "r.json"
    write_json(report, path)
    doc = json.loads(path.read_text())
    assert set(doc) >= {"runs", "oracle"}
    assert set(doc["oracle"]) >= {"gpu_hours_lb", "latency_lb_ms"}
    run = doc["runs"][0]
    assert run["policy"] == "static-rr"
    assert set(run["gpus"]) == {"max", "mean"}
    assert isinstance(run["gpus"]["max"], int)
    assert set(REQUIRED_METRICS) <= set(run["metrics"])
    for k in REQUIRED_METRICS:
        assert isinstance(run["metrics"][k], (int, float))
    assert "static-rr" in format_table(doc)


def test_run_entry_rejects_a_summary_missing_keys():
    with pytest.raises(ValueError, match="lacks"):
        run_entry("x", {"max_chunk_latency_ms": 1.0})


def test_event_loop_orders_by_time_then_push_order():
    loop = EventLoop()
    seen = []

    def handle(t, item):
        seen.append((t, item))
        if item == "a":
            return [(t + 1.0, "c"), (t, "b")]
        return None

    loop.push(5.0, "a")
    loop.push(5.0, "a2")
    loop.push(1.0, "first")
    end = loop.run(handle)
    assert [i for _, i in seen] == ["first", "a", "a2", "b", "c"]
    assert end == 6.0


def test_event_loop_stops_at_until():
    loop = EventLoop()
    for t in (1.0, 2.0, 3.0):
        loop.push(t, t)
    got = []
    loop.run(lambda t, i: got.append(i), until_s=2.5)
    assert got == [1.0, 2.0] and len(loop) == 1 and loop.now_s == 2.5
