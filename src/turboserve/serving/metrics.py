"""Prometheus metrics of the live server.

In: every chunk delivery (latency, SLO) as it happens, and the runtime's `ClusterInfo`
read at scrape time (workers, sessions by state, migrations, offloads, GPUs, cost).
Out: the text exposition at `GET /metrics`. Each server owns its own `CollectorRegistry`,
so several apps in one process (tests) never collide. `grafana/dashboard.json` plots these
names; keep the two in step.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..cluster.runtime import ChunkDelivery, ClusterInfo
from ..types import SessionState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Per-chunk latency buckets (ms): from launch-bound tiny rounds to multi-second misses.
LATENCY_BUCKETS_MS = (5, 10, 25, 50, 75, 100, 150, 200, 250, 350, 500, 750, 1000, 1500, 2500,
                      5000, 10000)


class ServingMetrics:
    def __init__(self, cluster_info: Callable[[], ClusterInfo], slo_ms_of: Callable[[str], float]):
        """`cluster_info` is called at scrape time; `slo_ms_of(session_id)` gives a session's
        per-chunk target when its chunk is delivered."""
        self.registry = CollectorRegistry()
        self._slo_ms_of = slo_ms_of
        self.chunk_latency = Histogram(
            "turboserve_chunk_latency_ms", "Per-chunk latency, due to delivered (ms)",
            ["worker"], buckets=LATENCY_BUCKETS_MS, registry=self.registry)
        self.chunks = Counter("turboserve_chunks", "Chunks delivered", ["worker"],
                              registry=self.registry)
        self.slo_misses = Counter("turboserve_slo_misses", "Chunks delivered later than the SLO",
                                  ["worker"], registry=self.registry)
        self.sessions_created = Counter("turboserve_sessions_created", "Sessions admitted",
                                        registry=self.registry)
        self.sessions_rejected = Counter("turboserve_sessions_rejected",
                                         "Session creations refused", ["reason"],
                                         registry=self.registry)
        self.registry.register(_ClusterCollector(cluster_info))

    def on_chunk(self, d: ChunkDelivery) -> None:
        self.chunk_latency.labels(d.worker).observe(d.latency_ms)
        self.chunks.labels(d.worker).inc()
        if d.latency_ms > self._slo_ms_of(d.session_id):
            self.slo_misses.labels(d.worker).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ClusterCollector:
    """Reads the cluster once per scrape; gauges are never stale between scrapes."""

    def __init__(self, cluster_info: Callable[[], ClusterInfo]):
        self._cluster_info = cluster_info

    def describe(self):
        return []  # dynamic: skip the registration-time collect

    def collect(self):
        info = self._cluster_info()
        by_state = GaugeMetricFamily("turboserve_sessions", "Live sessions by state", labels=["state"])
        for state in SessionState:
            by_state.add_metric([state.value], float(info.sessions_by_state.get(state.value, 0)))
        yield by_state
        load = GaugeMetricFamily("turboserve_worker_load_ms", "Predicted cycle time per worker (ms)",
                                 labels=["worker", "device"])
        batch = GaugeMetricFamily("turboserve_worker_batch", "Active sessions per worker",
                                  labels=["worker", "device"])
        resident = GaugeMetricFamily("turboserve_worker_sessions", "Resident sessions per worker",
                                     labels=["worker", "device"])
        round_ms = GaugeMetricFamily("turboserve_worker_round_ms", "Latest measured round (ms)",
                                     labels=["worker", "device"])
        for w in info.workers:
            load.add_metric([w.id, w.device], w.load_ms)
            batch.add_metric([w.id, w.device], float(w.batch))
            resident.add_metric([w.id, w.device], float(len(w.sessions)))
            round_ms.add_metric([w.id, w.device], w.last_round_ms)
        yield from (load, batch, resident, round_ms)
        yield GaugeMetricFamily("turboserve_gpus_provisioned", "Workers provisioned (billed)",
                                value=float(info.gpus_provisioned))
        yield GaugeMetricFamily("turboserve_gpus_ready", "Workers accepting sessions",
                                value=float(info.gpus_ready))
        yield CounterMetricFamily("turboserve_cost_usd", "Accumulated GPU cost (USD)",
                                  value=info.cost_usd)
        c = info.counters
        for name, help_text in (("migrations", "Migrations committed"),
                                ("migrations_aborted", "Migrations aborted"),
                                ("migration_bytes", "Bytes moved by migrations"),
                                ("offloads", "Idle sessions offloaded to host memory"),
                                ("resumes", "Sessions restored from host memory"),
                                ("prefetches", "Idle sessions restored from host memory before resuming"),
                                ("scale_outs", "Workers started"),
                                ("releases", "Workers released")):
            yield CounterMetricFamily(f"turboserve_{name}", help_text, value=float(c.get(name, 0)))
        yield GaugeMetricFamily("turboserve_decision_ms_p99", "Scheduler decision time p99 (ms)",
                                value=float(c.get("decision_ms_p99", 0.0)))
