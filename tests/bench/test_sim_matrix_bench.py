"""bench/sim_matrix.py's own logic without simulating: autoscale-only's ladder towards
turboserve's worst chunk and the search for static-ll's serving count (on made-up runs),
and the matrix over worker processes (`--jobs`) with the cell made up, against the same in
one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import _matrix_report  # noqa: E402
import _matrix_search  # noqa: E402
import sim_matrix  # noqa: E402

from turboserve.config import TurboConfig  # noqa: E402


def _fake_runs(monkeypatch, by_fraction: dict[float, tuple[float, float]]) -> list[float]:
    """simulate answers autoscale-only's (worst chunk ms, GPU-hours) for the target share
    it was given; returns the shares asked, in order."""
    asked = []

    def fake_simulate(records, policy, model, config, **kw):
        assert policy == "autoscale-only" and kw["until_s"] == 3600.0
        f = config.autoscale.target_capacity_fraction
        asked.append(f)
        max_ms, gpu_h = by_fraction[f]
        return SimpleNamespace(summary={"max_chunk_latency_ms": max_ms, "gpu_hours": gpu_h, "slo_attainment": 0.999})
    monkeypatch.setattr(_matrix_search, "simulate", fake_simulate)
    return asked


def _ladder(target_ms: float, default=(900.0, 4.0)):
    return _matrix_search.autoscale_only_at_latency(
        [], "fake", None, TurboConfig(), until_s=3600.0, target_ms=target_ms,
        default={"max_chunk_latency_ms": default[0], "gpu_hours": default[1], "slo_attainment": 0.9})


def test_the_ladder_stops_at_the_first_rung_that_reaches_the_target(monkeypatch):
    runs = {0.8: (800.0, 4.5), 0.6: (400.0, 5.0), 0.4: (300.0, 5.5)}
    asked = _fake_runs(monkeypatch, runs)
    got = _ladder(target_ms=450.0)
    assert asked == [0.8, 0.6]
    assert got["reached"] and got["target_capacity_fraction"] == 0.6 and got["gpu_hours"] == 5.0
    assert [t["target_capacity_fraction"] for t in got["tried"]] == [1.0, 0.8, 0.6]


def test_the_default_run_can_be_enough(monkeypatch):
    asked = _fake_runs(monkeypatch, {})
    got = _ladder(target_ms=950.0)
    assert asked == [] and got["reached"] and got["target_capacity_fraction"] == 1.0


def test_never_reached_compares_with_the_best_worst_chunk(monkeypatch):
    """Lowering the target does not always lower the worst chunk (the upscale and start-up
    delays stay); the rung with the best one is the comparison, flagged."""
    runs = {f: (500.0 + 100 * abs(f - 0.25), 4.0 + 10 * (1 - f)) for f in _matrix_search.LADDER}
    asked = _fake_runs(monkeypatch, runs)
    got = _ladder(target_ms=300.0)
    assert asked == list(_matrix_search.LADDER)
    assert not got["reached"] and got["target_capacity_fraction"] == 0.25
    assert _matrix_report._equal_latency(got, 0.1) == "-10.0% @0.25 never"


def _fake_cell(shape, gpus, kind, hours, seed, slo, cache, model, extra):
    lat = 100.0 + gpus + len(kind)
    return {"shape": shape, "gpus": gpus, "trace": kind, "seed": seed, "sessions": gpus + seed, "slo_explicit": slo is not None,
            "wall_s": 0.0, "latency_reduction_vs_static_ll": lat / 1000, "latency_reduction_vs_static_rr": 0.5,
            "cost_reduction_vs_peak_fixed": 0.1 + seed / 10, "cost_reduction_vs_autoscale_only": -0.2,
            "cost_reduction_vs_autoscale_only_equal_latency": 0.05,
            "autoscale_only_equal_latency": {"target_capacity_fraction": 0.4, "reached": True},
            "turboserve_latency_ok_vs_peak_fixed": True, "turboserve_latency_ok_vs_autoscale_only": True,
            "oracle_gap": 0.9, "equal_cost_gpus": gpus - 1, "latency_reduction_at_equal_cost_vs_static_ll": 0.4,
            "latency_reduction_at_equal_cost_vs_static_rr": 0.5, "baselines_on_floor": False,
            "slo_attainment": {"turboserve": 0.9995, "turboserve-no-autoscale": 1.0}, "report": {"extra": list(extra)}}


@pytest.mark.parametrize("jobs", [1, 2])
def test_jobs_keep_the_cells_and_their_order(monkeypatch, tmp_path, jobs):
    monkeypatch.setattr(sim_matrix, "run_cell", _fake_cell)  # forked workers inherit it
    out = tmp_path / "m.json"
    argv = ["--shapes", "demo91,wan1.3b-320p", "--gpus", "8,16", "--traces", "synthetic,mooncake",
            "--cache", str(tmp_path), "--json", str(out), "--jobs", str(jobs), "--set", "a.b=1"]
    assert sim_matrix.main(argv) == 0
    data = json.loads(out.read_text())
    keys = [(c["shape"], c["gpus"], c["trace"]) for c in data["cells"]]
    assert keys == [(s, g, k) for s in ("demo91", "wan1.3b-320p") for g in (8, 16) for k in ("synthetic", "mooncake")]
    assert all(c["report"] == {"extra": ["a.b=1"]} and c["seed"] == 0 for c in data["cells"])
    assert data["averages"]["cells_autoscale_only_reached_equal_latency"] == 8
    assert "per_seed" not in data["averages"] and data["seeds"] == [0]


def test_seeds_run_every_cell_once_each_and_average_per_seed(monkeypatch, tmp_path):
    monkeypatch.setattr(sim_matrix, "run_cell", _fake_cell)
    out = tmp_path / "m.json"
    argv = ["--shapes", "demo91", "--gpus", "8,16", "--traces", "synthetic", "--seeds", "0,2",
            "--cache", str(tmp_path), "--json", str(out), "--jobs", "2"]
    assert sim_matrix.main(argv) == 0
    data = json.loads(out.read_text())
    assert [(c["seed"], c["gpus"]) for c in data["cells"]] == [(0, 8), (0, 16), (2, 8), (2, 16)]
    avg = data["averages"]
    assert avg["cost_reduction_vs_peak_fixed"] == pytest.approx(0.2)
    assert avg["per_seed"]["0"]["cost_reduction_vs_peak_fixed"] == pytest.approx(0.1)
    assert avg["per_seed"]["2"]["cost_reduction_vs_peak_fixed"] == pytest.approx(0.3)
    with pytest.raises(SystemExit):
        sim_matrix.main([*argv[:-2], "--seeds", "0,x"])


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(SystemExit):
        sim_matrix.main(["--quick", "--jobs", "0", "--cache", str(tmp_path), "--json", str(tmp_path / "x.json")])


@pytest.mark.parametrize("flag, value, says", [("--traces", "synthtic", "synthetic-mixed"),
                                               ("--shapes", "demo9", "wan14b-480p"),
                                               ("--gpus", "8,x", "integers"), ("--gpus", "0", "at least 1")])
def test_a_typo_in_the_matrix_is_refused_before_any_cell_runs(monkeypatch, tmp_path, capsys, flag, value, says):
    monkeypatch.setattr(sim_matrix, "run_cell", lambda *a, **k: pytest.fail("a cell ran"))
    with pytest.raises(SystemExit) as e:
        sim_matrix.main([flag, value, "--cache", str(tmp_path), "--json", str(tmp_path / "x.json")])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_quick_run_leaves_the_committed_results_alone(monkeypatch, tmp_path):
    monkeypatch.setattr(sim_matrix, "run_cell", _fake_cell)
    monkeypatch.setattr(sim_matrix, "REPO", tmp_path)
    assert sim_matrix.main(["--quick", "--cache", str(tmp_path)]) == 0
    assert (tmp_path / "runs" / "sim_matrix-quick.json").is_file()
    assert not (tmp_path / "bench").exists()
    assert sim_matrix.main(["--shapes", "demo91", "--gpus", "8", "--traces", "synthetic", "--cache", str(tmp_path)]) == 0
    assert (tmp_path / "bench" / "results" / "sim_matrix.json").is_file()


def test_merge_joins_parts_and_refuses_a_cell_twice(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sim_matrix, "run_cell", _fake_cell)
    parts = []
    for seed, traces in (("0", "synthetic"), ("0", "mooncake"), ("1", "synthetic,mooncake")):
        parts.append(tmp_path / f"part{len(parts)}.json")
        assert sim_matrix.main(["--shapes", "demo91", "--gpus", "8", "--traces", traces, "--seeds", seed,
                                "--cache", str(tmp_path), "--json", str(parts[-1])]) == 0
    out = tmp_path / "all.json"
    assert sim_matrix.main(["--merge", *map(str, parts), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(c["trace"], c["seed"]) for c in data["cells"]] == [
        ("synthetic", 0), ("mooncake", 0), ("synthetic", 1), ("mooncake", 1)]
    assert data["seeds"] == [0, 1] and set(data["averages"]["per_seed"]) == {"0", "1"}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sim_matrix.main(["--merge", str(parts[0]), str(out), "--json", str(tmp_path / "x.json")])
    assert "already in an earlier file" in capsys.readouterr().err
    other = json.loads(parts[1].read_text()) | {"hours": 0.5}
    parts[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit):
        sim_matrix.main(["--merge", str(parts[0]), str(parts[1]), "--json", str(tmp_path / "x.json")])
    assert "not one matrix" in capsys.readouterr().err


def test_the_mixed_synthetic_trace_has_two_step_counts(tmp_path):
    """`--traces synthetic-mixed`: the synthetic trace with half its sessions at 2 steps."""
    from turboserve.profile import load_latency_model
    from turboserve.traces.schema import read_trace

    model = load_latency_model()
    path = sim_matrix.make_trace("synthetic-mixed", "demo91", 2, 0.1, 0, None, tmp_path, model)
    assert path.name.startswith("synthetic-mixed-demo91-2g")
    steps = [r.spec.steps for r in read_trace(path)]
    assert set(steps) == {2, 4} and 0.3 < steps.count(2) / len(steps) < 0.7
    plain = sim_matrix.make_trace("synthetic", "demo91", 2, 0.1, 0, None, tmp_path, model)
    assert {r.spec.steps for r in read_trace(plain)} == {4}
    with pytest.raises(ValueError, match="synthetic-mixed"):
        sim_matrix.make_trace("bursty", "demo91", 2, 0.1, 0, None, tmp_path, model)


def _fake_counts(monkeypatch, attainment, worst_ms=lambda n: 1000.0 / n) -> list[int]:
    """simulate answers static-ll's SLO attainment and worst chunk for the GPU count it was
    given; returns the counts asked, in order."""
    asked = []

    def fake_simulate(records, policy, model, config, **kw):
        assert policy == "static-ll"
        n = config.cluster.gpus
        asked.append(n)
        return SimpleNamespace(summary={"slo_attainment": attainment(n), "gpu_hours": float(n),
                                        "max_chunk_latency_ms": worst_ms(n)})
    monkeypatch.setattr(_matrix_search, "simulate", fake_simulate)
    return asked


def _serving(gpus: int, attainment, worst_ms=lambda n: 1000.0 / n) -> dict:
    at_n = {"slo_attainment": attainment(gpus), "gpu_hours": float(gpus), "max_chunk_latency_ms": worst_ms(gpus)}
    return _matrix_search.static_ll_serving_count([], "fake", None, TurboConfig(), until_s=3600.0, gpus=gpus,
                                                  at_n=at_n, slo_ms=250.0)


def test_short_of_the_slo_at_n_the_search_goes_up_then_bisects(monkeypatch):
    def attainment(n):
        return 0.9995 if n >= 21 else 0.99
    asked = _fake_counts(monkeypatch, attainment)
    got = _serving(16, attainment)
    assert asked == [18, 20, 24, 22, 21]  # 1.125, 1.25, 1.5 x N; then halving the bracket (20, 24]
    assert got["reached"] and got["gpus"] == 21 and got["gpu_hours"] == 21.0
    assert [t["gpus"] for t in got["tried"]] == [16, 18, 20, 21, 22, 24]


def test_within_the_slo_at_n_the_search_goes_down(monkeypatch):
    """N is the count whose perfect packing serves the fitted peak; a brief peak can be
    served with fewer GPUs, and then the fewer is the reference."""
    def attainment(n):
        return 0.9991 if n >= 13 else 0.998
    asked = _fake_counts(monkeypatch, attainment)
    got = _serving(16, attainment)
    assert asked == [14, 12, 13]
    assert got["reached"] and got["gpus"] == 13


def test_no_count_up_to_twice_n_serves(monkeypatch):
    def attainment(n):
        return 0.95 + n / 1000  # better with more GPUs, never within the SLO
    asked = _fake_counts(monkeypatch, attainment)
    got = _serving(16, attainment)
    assert asked == [18, 20, 24, 32]
    assert not got["reached"] and got["gpus"] == 32  # the best attainment tried is reported


def test_a_count_where_sessions_wait_for_a_gpu_does_not_serve(monkeypatch):
    """One late first chunk per queued session hardly moves the attainment; the worst chunk
    (minutes) says the peak was not served."""
    def attainment(n):
        return 0.9995

    def worst_ms(n):
        return 200.0 if n >= 15 else 120_000.0
    asked = _fake_counts(monkeypatch, attainment, worst_ms)
    got = _serving(16, attainment, worst_ms)
    assert asked == [14, 15]
    assert got["reached"] and got["gpus"] == 15


def test_every_count_down_to_one_serves(monkeypatch):
    asked = _fake_counts(monkeypatch, lambda n: 1.0, lambda n: 100.0)
    got = _serving(2, lambda n: 1.0, lambda n: 100.0)
    assert asked == [1] and got["reached"] and got["gpus"] == 1


def test_the_bisection_stops_at_a_sixteenth_of_n(monkeypatch):
    def attainment(n):
        return 0.9999 if n >= 75 else 0.99
    asked = _fake_counts(monkeypatch, attainment)
    got = _serving(64, attainment)
    assert asked == [72, 80, 76]  # (72, 80] -> (72, 76]: 4 GPUs wide, a sixteenth of 64
    assert got["gpus"] == 76


def _recorded_cell(gpus: int, seed: int, ts_gpu_h: float, ts_max_ms: float) -> dict:
    """A cell as a results file keeps it: the report's runs are what --add-peak-search reads."""
    runs = [{"policy": "static-ll", "metrics": {"slo_attainment": 0.998, "gpu_hours": float(gpus),
                                               "max_chunk_latency_ms": 1000.0 / gpus}},
            {"policy": "turboserve", "metrics": {"gpu_hours": ts_gpu_h, "max_chunk_latency_ms": ts_max_ms}}]
    return _fake_cell("demo91", gpus, "mooncake", 1.0, seed, None, None, None, ()) | {
        "slo_ms": 250.0, "cost_reduction_vs_peak_fixed": 1 - ts_gpu_h / gpus, "report": {"runs": runs}}


def test_add_peak_search_keeps_the_recorded_runs_and_adds_the_comparison(monkeypatch, tmp_path, capsys):
    asked = _fake_counts(monkeypatch, lambda n: 0.9995 if n >= 10 else 0.99)
    monkeypatch.setattr(sim_matrix, "_cell_inputs", lambda *a: ([], TurboConfig()))
    src, out = tmp_path / "m.json", tmp_path / "out.json"
    cells = [_recorded_cell(8, 0, 7.0, 20.0), _recorded_cell(8, 1, 8.0, 500.0)]
    src.write_text(json.dumps({"hours": 1.0, "seeds": [0, 1], "policies": [], "cells": cells, "averages": {},
                               "notes": {}}))
    assert sim_matrix.main(["--add-peak-search", str(src), "--json", str(out), "--cache", str(tmp_path)]) == 0
    assert asked == [9, 10] * 2  # static-ll at 8 came from the file
    data = json.loads(out.read_text())
    first, second = data["cells"]
    assert first["report"] == cells[0]["report"]
    assert first["static_ll_serving"]["gpus"] == 10
    assert first["cost_reduction_vs_peak_served"] == pytest.approx(0.3)  # 7 GPU-h against 10
    assert first["turboserve_latency_ok_vs_peak_served"] is True
    assert second["turboserve_latency_ok_vs_peak_served"] is False  # 500 ms against static-ll's 100
    assert data["averages"]["cost_reduction_vs_peak_served"] == pytest.approx((0.3 + 0.2) / 2)
    assert data["averages"]["cells_peak_served_reached"] == 2
    table = capsys.readouterr().out
    assert "-30.0% @10" in table and "-20.0% @10 (worse max)" in table
    # where no count serves, the all-cells average falls back to N (a lower bound there)
    _fake_counts(monkeypatch, lambda n: 0.9)
    assert sim_matrix.main(["--add-peak-search", str(src), "--json", str(out), "--cache", str(tmp_path)]) == 0
    avg = json.loads(out.read_text())["averages"]
    assert avg["cells_peak_served_reached"] == 0 and avg["cost_reduction_vs_peak_served"] is None
    assert avg["cost_reduction_vs_peak_served_else_n"] == pytest.approx((1 / 8 + 0) / 2)
    assert "never" in capsys.readouterr().out
    # without --json the file searched is updated in place (not the matrix's default results)
    monkeypatch.setattr(sim_matrix, "REPO", tmp_path)
    assert sim_matrix.main(["--add-peak-search", str(src), "--cache", str(tmp_path)]) == 0
    assert "static_ll_serving" in json.loads(src.read_text())["cells"][0]
    assert not (tmp_path / "bench").exists()


def test_add_peak_search_refuses_a_file_it_cannot_read(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sim_matrix.main(["--add-peak-search", str(tmp_path / "missing.json"), "--json", str(tmp_path / "x.json")])
    assert e.value.code == 2 and "missing.json" in capsys.readouterr().err
