"""`turboserve simulate` through `cli.main`: JSON and PNGs written, infeasible shapes refused."""

from __future__ import annotations

import json
import math

import pytest

from turboserve.cli import main
from turboserve.sim.report import REQUIRED_METRICS, REQUIRED_ORACLE


def test_simulate_writes_json_and_plots(small_trace_path, tmp_path, capsys):
    out = tmp_path / "report.json"
    plots = tmp_path / "plots"
    rc = main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "3",
               "--policy", "static-rr,turboserve", "--json", str(out), "--plot", str(plots)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "static-rr" in printed and "turboserve" in printed and "oracle" in printed
    assert "autoscalers start at 2 GPUs (warm: demand over the first 60 s)" in printed
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["runs"]][:2] == ["static-rr", "turboserve"]
    for run in doc["runs"]:
        assert set(run) >= {"policy", "gpus", "metrics"}
        assert set(run["gpus"]) == {"max", "mean"}
        assert set(REQUIRED_METRICS) <= set(run["metrics"])
    assert set(REQUIRED_ORACLE) <= set(doc["oracle"])
    assert doc["oracle"]["gpu_hours_lb"] <= min(r["metrics"]["gpu_hours"] for r in doc["runs"])
    for name in ("latency_cdf.png", "gpus_over_time.png", "cost.png"):
        png = plots / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fixed_count_baselines_also_run_at_turboserves_mean_gpu_count(small_trace_path, tmp_path, capsys):
    # DESIGN.md: fixed-count baselines at the peak count and at turboserve's average count
    out = tmp_path / "report.json"
    assert main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "6",
                 "--policy", "static-ll,turboserve,autoscale-only,static-rr", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    by = {r["policy"]: r for r in doc["runs"]}
    mean = by["turboserve"]["gpus"]["mean"]
    n = max(1, math.floor(mean + 0.5))
    assert n < 6, "the trace must leave turboserve below the ceiling for this test"
    assert doc["equal_cost"] == {"gpus": n, "turboserve_gpus_mean": mean, "policies": ["static-ll", "static-rr"]}
    # only the fixed-count baselines run again, after every policy asked for
    assert [r["policy"] for r in doc["runs"]] == ["static-ll", "turboserve", "autoscale-only", "static-rr",
                                                   "static-ll@equal-cost", "static-rr@equal-cost"]
    for name in ("static-ll", "static-rr"):
        peak, same = by[name], by[name + "@equal-cost"]
        assert (peak["gpus"]["max"], same["gpus"]["max"]) == (6, n)
        assert same["gpus"]["mean"] == pytest.approx(n) and same["gpu_count"] == "equal-cost"
        assert same["metrics"]["gpu_hours"] < peak["metrics"]["gpu_hours"]
        assert same["metrics"]["max_chunk_latency_ms"] >= peak["metrics"]["max_chunk_latency_ms"] - 1e-6
    assert f"equal cost: static-ll, static-rr again at {n} GPUs" in printed
    assert "static-ll@equal-cost" in printed

    # asked not to: no extra rows; and none without turboserve to match
    assert main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "6",
                 "--policy", "static-ll,turboserve", "--json", str(out), "--no-equal-cost"]) == 0
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["runs"]] == ["static-ll", "turboserve"] and "equal_cost" not in doc
    assert main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "6",
                 "--policy", "static-ll", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["runs"]] == ["static-ll"] and "equal_cost" not in doc


def test_infeasible_shape_is_refused_without_explicit_slo(small_trace_path, capsys):
    rc = main(["simulate", "--trace", str(small_trace_path), "--model", "wan14b-480p", "--gpus", "2",
               "--policy", "static-ll"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "infeasible" in err and "--slo-ms" in err


def test_unreachable_explicit_slo_is_refused_too(small_trace_path, capsys):
    rc = main(["simulate", "--trace", str(small_trace_path), "--model", "wan14b-480p", "--gpus", "2",
               "--policy", "static-ll", "--slo-ms", "1000"])
    assert rc == 2
    assert "no GPU count serves it" in capsys.readouterr().err


def test_a_gpu_too_small_for_one_session_is_named_as_memory(small_trace_path, capsys):
    # demo91 runs a session in 98 ms of its 250 ms chunk: memory, not time, is what is short
    rc = main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "2",
               "--policy", "static-ll", "--set", "cluster.gpu_memory_bytes=1000000000"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "do not fit in a GPU's 1.00 GB (cluster.gpu_memory_bytes" in err and "ms per chunk" not in err


def test_unknown_policy_and_link_are_named(small_trace_path, capsys):
    assert main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "2",
                 "--policy", "nope"]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "2",
                 "--policy", "static-ll", "--link", "carrier-pigeon"]) == 2
    assert "--link" in capsys.readouterr().err


def test_autoscalers_start_warm_at_the_demand_of_the_first_startup_delay(small_records, model, capsys):
    """A replayed window starts with the GPUs its first start-up delay needs (the same for
    every autoscaling policy), unless autoscale.initial_gpus is set; fixed ones keep --gpus."""
    import math
    from dataclasses import replace

    from turboserve.config import TurboConfig
    from turboserve.sim.driver import simulate, warm_start_gpus
    from turboserve.traces.rescale import demand_curve

    cfg = TurboConfig()
    cfg = replace(cfg, cluster=replace(cfg.cluster, gpus=3, min_gpus=1))
    delay = cfg.cluster.startup_delay_s
    peak = max(g for t, g in demand_curve(small_records, model, "demo91") if t <= delay)
    warm = warm_start_gpus(small_records, model, cfg, "demo91")
    assert warm == max(1, min(3, math.ceil(peak - 1e-9)))
    late = [replace(r, arrival_s=r.arrival_s + 10 * delay) for r in small_records]
    assert warm_start_gpus(late, model, cfg, "demo91") == 1  # nothing in the first delay
    set_cfg = replace(cfg, autoscale=replace(cfg.autoscale, initial_gpus=2))
    assert warm_start_gpus(small_records, model, set_cfg, "demo91") == 2
    for name in ("autoscale-only", "turboserve", "turboserve-no-migration"):
        res = simulate(small_records, name, model, cfg, shape="demo91", until_s=1.0)
        assert res.metrics.gpu_series[0][2] == warm, name  # ready at t=0
        res = simulate(small_records, name, model, set_cfg, shape="demo91", until_s=1.0)
        assert res.metrics.gpu_series[0][2] == 2, name
    res = simulate(small_records, "static-ll", model, cfg, shape="demo91", until_s=1.0)
    assert res.metrics.gpu_series[0][2] == 3


def test_until_stops_the_replay_and_is_checked(small_trace_path, tmp_path, capsys):
    out = tmp_path / "cut.json"
    assert main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "3",
                 "--policy", "static-ll", "--no-equal-cost", "--until", "60", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["until_s"] == 60.0
    assert doc["runs"][0]["metrics"]["duration_s"] == 60.0
    full = tmp_path / "full.json"
    assert main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "3",
                 "--policy", "static-ll", "--no-equal-cost", "--json", str(full)]) == 0
    assert json.loads(full.read_text())["runs"][0]["metrics"]["duration_s"] > 60.0
    capsys.readouterr()
    assert main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "3",
                 "--until", "0"]) == 2
    assert "--until must be > 0" in capsys.readouterr().err


def _figures(doc: dict) -> list:
    """Every figure of a report but the wall-clock ones (decision times)."""
    return [(r["policy"], r["gpus"], {k: v for k, v in r["metrics"].items() if not k.startswith("decision_ms")})
            for r in doc["runs"]]


def test_jobs_run_the_policies_in_processes_with_the_same_figures(small_trace_path, tmp_path, capsys):
    docs = []
    for jobs in ("1", "3"):
        out = tmp_path / f"jobs{jobs}.json"
        assert main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "6",
                     "--policy", "static-ll,turboserve,autoscale-only", "--json", str(out),
                     "--jobs", jobs]) == 0
        docs.append(json.loads(out.read_text()))
    one, three = docs
    # the equal-cost rerun of static-ll comes after the others, in the order asked, both ways
    assert [r["policy"] for r in three["runs"]] == ["static-ll", "turboserve", "autoscale-only",
                                                     "static-ll@equal-cost"]
    assert _figures(three) == _figures(one)
    assert three["oracle"] == one["oracle"] and three["equal_cost"] == one["equal_cost"]
    capsys.readouterr()
    assert main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "3",
                 "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_a_run_that_fails_in_a_worker_process_is_reported_and_the_others_kept(small_records, model):
    from turboserve.config import TurboConfig
    from turboserve.sim.jobs import TaskRunner

    config = TurboConfig()
    tasks = [("a", "static-ll", config), ("broken", "no-such-policy", config), ("b", "static-rr", config)]
    with TaskRunner(small_records, model, "demo91", 120.0, jobs=2) as runner:
        outcomes = [h.result() for h in [runner.submit(t) for t in tasks]]
    assert [label for label, _, _ in outcomes] == ["a", "broken", "b"]
    (_, a, a_err), (_, broken, why), (_, b, b_err) = outcomes
    assert a_err is None and b_err is None and a.summary["chunks"] > 0 and b.summary["chunks"] > 0
    assert broken is None and "no-such-policy" in why
