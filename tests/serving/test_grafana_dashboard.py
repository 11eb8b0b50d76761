"""The Grafana dashboard only queries metrics the server really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from turboserve.cluster.runtime import ChunkDelivery, ClusterInfo, WorkerInfo
from turboserve.serving.metrics import ServingMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "dashboard.json"


def exported_names() -> set[str]:
    info = ClusterInfo(now_s=1.0, policy="turboserve",
                       workers=(WorkerInfo("w0", "cpu", "ready", 12.0, 2, ("a", "b"), 11.0),),
                       migrations=(), counters={"migrations": 1, "offloads": 2},
                       sessions_by_state={"active": 2}, gpus_provisioned=1, gpus_ready=1,
                       cost_usd=0.01, slo_ms=250.0)
    m = ServingMetrics(lambda: info, lambda sid: 250.0)
    m.on_chunk(ChunkDelivery("a", 0, None, 300.0, "w0", 1.0))
    m.sessions_created.inc()
    m.sessions_rejected.labels("capacity").inc()
    text = m.exposition().decode()
    names = {line.split("{")[0].split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert "turboserve_slo_misses_total 1.0" in text.replace('{worker="w0"}', "")
    return names


def test_dashboard_queries_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set(re.findall(r"turboserve_[a-z0-9_]+", " ".join(exprs)))
    assert len(used) >= 15
    missing = used - exported_names()
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("latency", "slo", "sessions", "load", "batch", "migrations", "offloads", "gpus", "cost"):
        assert topic in titles, topic
