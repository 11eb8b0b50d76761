"""`turboserve simulate` through `cli.main`: JSON and PNGs written, infeasible shapes refused."""

from __future__ import annotations

import json

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
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["runs"]] == ["static-rr", "turboserve"]
    for run in doc["runs"]:
        assert set(run) >= {"policy", "gpus", "metrics"}
        assert set(run["gpus"]) == {"max", "mean"}
        assert set(REQUIRED_METRICS) <= set(run["metrics"])
    assert set(REQUIRED_ORACLE) <= set(doc["oracle"])
    assert doc["oracle"]["gpu_hours_lb"] <= min(r["metrics"]["gpu_hours"] for r in doc["runs"])
    for name in ("latency_cdf.png", "gpus_over_time.png", "cost.png"):
        png = plots / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_unknown_policy_and_link_are_named(small_trace_path, capsys):
    assert main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "2",
                 "--policy", "nope"]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(small_trace_path), "--model", "demo91", "--gpus", "2",
                 "--policy", "static-ll", "--link", "carrier-pigeon"]) == 2
    assert "--link" in capsys.readouterr().err
