"""bench/fidelity.py without a live server: its helpers on made-up clients, and the whole
analysis redone from a recorded live run (`--from-dump`; the fixture is a real run of
`--sessions 2 --repeat 2 --live-repeats 1` on two CPU engines)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import fidelity  # noqa: E402

DUMP = Path(__file__).parent / "data" / "fidelity-dump-2copies.json"


def test_copies_are_interleaved_tagged_and_found_again():
    from turboserve.serving.cli import demo_trace

    trace, cal = demo_trace(2, seed=0), demo_trace(2, seed=1)
    combined = fidelity.interleaved(trace, cal, 3)
    tags = [r.id.split(".")[0] for r in combined]
    assert tags == ["t0"] * 2 + ["c0"] * 2 + ["t1"] * 2 + ["c1"] * 2 + ["t2"] * 2 + ["c2"] * 2
    assert [fidelity.copy_of(r.id) for r in combined[::2]] == [0, 0, 1, 1, 2, 2]
    starts = [min(r.arrival_s for r in combined if r.id.startswith(t + ".")) for t in ("t0", "c0", "t1")]
    assert starts == sorted(starts) and len(set(starts)) == 3
    with pytest.raises(SystemExit, match="--repeat"):
        fidelity.interleaved(trace, cal, 0)


def test_rounds_with_sessions_of_both_kinds_belong_to_neither():
    tag = {"a": "t", "b": "c"}
    rounds = [(1, 0.0, 4, 10.0), (1, 0.0, 4, 11.0), (2, 0.0, 4, 12.0)]
    got = fidelity.rounds_of("t", tag, rounds, [False, True, False], [("a",), ("b",), ("a", "b")])
    assert got == ([rounds[0]], [False])


def test_the_live_p99_interval_resamples_whole_copies():
    # copy 0 slow at its tail, copies 1-3 not: the p99 is 500 ms when copy 0 is drawn (in
    # 68% of the resamples), 60 ms when not
    clients = [{"trace_id": f"t{i}.s", "latencies_ms": [50.0] * 90 + [500.0 if i == 0 else 60.0] * 10}
               for i in range(4)] + [{"trace_id": "c0.s", "latencies_ms": [9999.0]}]  # a calibration copy
    (p50_lo, p50_hi), (p99_lo, p99_hi) = fidelity.copy_bootstrap(clients, draws=400)
    assert p50_lo == p50_hi == 50.0
    assert p99_lo == pytest.approx(60.0) and p99_hi == pytest.approx(500.0)


def test_the_analysis_is_redone_from_a_recorded_live_run(tmp_path, capsys):
    out = tmp_path / "f.json"
    assert fidelity.main(["--from-dump", str(DUMP), "--sessions", "2", "--repeat", "2", "--sim-seeds", "2",
                          "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for row in ("sim calibrated", "sim cal. pooled", "sim held-out", "live (client)", "live run 1:"):
        assert row in table
    d = json.loads(out.read_text())
    live = d["runs"]["live (client)"]
    assert live["chunks"] == d["runs"]["sim held-out"]["chunks"] > 0  # the same chunks, simulated and live
    assert live["p50_rel_err"] == 0.0
    for name, row in d["runs"].items():
        assert math.isfinite(row["p50_rel_err"]) and math.isfinite(row["p99_rel_err"]), name
        assert abs(row["p50_rel_err"]) < 0.5, name  # the calibrated rows track the live median
    (run,) = d["per_live_run"]
    lo, hi = run["live_p99_ci90_ms"]
    assert lo <= run["live_p99_ms"] <= hi
    assert run["calibrated_p50_rel_err"] == pytest.approx(d["runs"]["sim calibrated"]["p50_rel_err"])
    assert Path(str(out.with_suffix(".profile.json"))).exists()


def test_one_copy_leaves_no_fold_to_hold_out(tmp_path):
    """`--repeat 1`: no odd copy to calibrate the even one on; the held-out row is skipped."""
    from turboserve.config import TurboConfig
    from turboserve.profile import load_profiles

    run = json.loads(DUMP.read_text())
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(run["profile"]))
    base = load_profiles(path)[0]
    live = run["runs"][0]
    one_copy = [c for c in live["clients"] if fidelity.copy_of(c["trace_id"]) == 0]
    assert fidelity.held_out_metrics([], "turboserve", base, one_copy, live["rounds"], live["busy_at_start"],
                                     live["members"], TurboConfig(), 1, 250.0) is None
