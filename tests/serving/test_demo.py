"""`turboserve demo` as a new user runs it: a server, a short trace, a report, MP4s."""

from __future__ import annotations

import json
import os
import time

from turboserve.cli import main
from turboserve.sim.report import REQUIRED_METRICS


def test_the_demo_serves_its_trace_and_lists_only_this_runs_recordings(tmp_path, capsys):
    out = tmp_path / "demo"
    old = out / "recordings" / "earlier-run.mp4"  # an earlier demo's recording in the same folder
    old.parent.mkdir(parents=True)
    old.write_bytes(b"not this run")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))

    assert main(["demo", "--out", str(out), "--sessions", "2"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    metrics = report["runs"][0]["metrics"]
    assert set(REQUIRED_METRICS) <= set(metrics)
    assert metrics["chunks"] > 0 and metrics["unfinished_chunks"] == 0
    assert not report["meta"]["errors"]
    ours = sorted(p for p in (out / "recordings").glob("*.mp4") if p != old)
    assert len(ours) == 2 and all(p.stat().st_size > 0 for p in ours)
    assert "2 recordings of this run" in printed and "earlier-run" not in printed
    assert (out / "trace.jsonl").exists()
