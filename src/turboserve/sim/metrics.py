"""Run metrics: per-chunk latency, stalls, jitter, GPU-hours and cost, mechanism counters.

In: what the simulator observes while it runs — chunk latencies (one value with a count,
so a round of many sessions costs one append, not one per chunk), delivery intervals,
provisioned/ready GPU counts and active sessions over time, migrations, offloads,
restores, the controller's decision times. Out: `RunMetrics.summary(end_s)`, a flat dict
of numbers (the report's `metrics`) plus time series for the plots.

Memory stays small: latencies live in `array('d')` buffers of (value, count) pairs,
8+8 bytes per recorded group, never one Python float per chunk.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

import numpy as np


def weighted_quantile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """Nearest-rank quantile of `values` each repeated `counts` times (q in [0, 1])."""
    if values.size == 0:
        return 0.0
    order = np.argsort(values, kind="stable")
    v = values[order]
    cum = np.cumsum(counts[order])
    total = cum[-1]
    if total <= 0:
        return 0.0
    rank = max(1.0, math.ceil(q * total))  # 1-based rank of the wanted chunk
    idx = int(np.searchsorted(cum, rank, side="left"))
    return float(v[min(idx, v.size - 1)])


@dataclass(frozen=True)
class Prices:
    on_demand_usd_per_gpu_hour: float = 2.50
    spot_usd_per_gpu_hour: float = 1.00
    spot_fraction: float = 0.0  # share of GPU-hours billed at the spot price

    @property
    def blended_usd_per_gpu_hour(self) -> float:
        f = min(max(self.spot_fraction, 0.0), 1.0)
        return (1.0 - f) * self.on_demand_usd_per_gpu_hour + f * self.spot_usd_per_gpu_hour


class RunMetrics:
    """Accumulates one policy's run. `slo_ms` decides attainment; `playback_ms` (a chunk's
    playback duration) decides stalls: a chunk later than its playback time stalls the
    viewer for the difference."""

    def __init__(self, slo_ms: float, playback_ms: float, prices: Prices = Prices(),
                 start_s: float = 0.0) -> None:
        if slo_ms <= 0 or playback_ms <= 0:
            raise ValueError(f"slo_ms and playback_ms must be positive, got {slo_ms}, {playback_ms}")
        self.slo_ms = float(slo_ms)
        self.playback_ms = float(playback_ms)
        self.prices = prices
        self.start_s = start_s
        self._lat_ms = array("d")  # chunk latency values
        self._lat_n = array("d")  # how many chunks had that value
        self._gap_ms = array("d")  # delivery intervals within an active period
        self._gap_n = array("d")
        self.unfinished_chunks = 0  # chunks still owed at the end (counted with their wait)
        # (time_s, provisioned, ready) at every change; billing integrates `provisioned`
        self.gpu_series: list[tuple[float, int, int]] = [(start_s, 0, 0)]
        # (time_s, active sessions) at every change
        self.active_series: list[tuple[float, int]] = [(start_s, 0)]
        self.migrations = 0
        self.migrations_aborted = 0
        self.migration_bytes = 0
        self.migration_downtime_ms = 0.0
        self.migration_downtime_max_ms = 0.0
        self.offloads = 0
        self.offload_bytes = 0
        self.restores = 0
        self.restore_bytes = 0
        self.decision_ms: np.ndarray = np.zeros(0)

    # ---- chunks ---------------------------------------------------------------------------
    def record_chunks(self, latency_ms: float, count: int = 1) -> None:
        """`count` chunks were delivered, each `latency_ms` after it was due."""
        if count > 0:
            self._lat_ms.append(latency_ms)
            self._lat_n.append(count)

    def record_intervals(self, interval_ms: float, count: int = 1) -> None:
        """`count` sessions got a chunk `interval_ms` after their previous one (same period)."""
        if count > 0:
            self._gap_ms.append(interval_ms)
            self._gap_n.append(count)

    def record_unfinished(self, waited_ms: float, count: int = 1) -> None:
        """Chunks due but undelivered when the run ended: counted with the wait so far, so a
        policy that starves sessions cannot look good by never delivering."""
        self.record_chunks(waited_ms, count)
        self.unfinished_chunks += count

    # ---- provisioning and demand ----------------------------------------------------------
    def gpus_changed(self, time_s: float, provisioned: int, ready: int) -> None:
        last = self.gpu_series[-1]
        if last[1] == provisioned and last[2] == ready:
            return
        if last[0] == time_s:
            self.gpu_series[-1] = (time_s, provisioned, ready)
        else:
            self.gpu_series.append((time_s, provisioned, ready))

    def active_changed(self, time_s: float, active: int) -> None:
        last = self.active_series[-1]
        if last[1] == active:
            return
        if last[0] == time_s:
            self.active_series[-1] = (time_s, active)
        else:
            self.active_series.append((time_s, active))

    # ---- mechanisms -----------------------------------------------------------------------
    def record_migration(self, ok: bool, nbytes: int, downtime_ms: float) -> None:
        if not ok:
            self.migrations_aborted += 1
            return
        self.migrations += 1
        self.migration_bytes += int(nbytes)
        self.migration_downtime_ms += downtime_ms
        self.migration_downtime_max_ms = max(self.migration_downtime_max_ms, downtime_ms)

    def record_offload(self, nbytes: int) -> None:
        self.offloads += 1
        self.offload_bytes += int(nbytes)

    def record_restore(self, nbytes: int) -> None:
        self.restores += 1
        self.restore_bytes += int(nbytes)

    def set_decision_times(self, samples_ms) -> None:
        self.decision_ms = np.asarray(list(samples_ms) if not isinstance(samples_ms, np.ndarray)
                                      else samples_ms, dtype=float)

    # ---- results --------------------------------------------------------------------------
    def latencies(self) -> tuple[np.ndarray, np.ndarray]:
        """(values_ms, counts) as numpy arrays (views of the buffers' copies)."""
        return (np.frombuffer(self._lat_ms, dtype=float).copy(),
                np.frombuffer(self._lat_n, dtype=float).copy())

    def gpu_seconds(self, end_s: float) -> tuple[float, float, int]:
        """(provisioned GPU-seconds, mean provisioned, max provisioned) over [start, end]."""
        total = 0.0
        peak = 0
        series = self.gpu_series
        for i, (t, prov, _ready) in enumerate(series):
            t_next = series[i + 1][0] if i + 1 < len(series) else end_s
            t_next = min(t_next, end_s)
            if t_next > t:
                total += prov * (t_next - t)
            if t <= end_s:
                peak = max(peak, prov)
        span = max(end_s - self.start_s, 1e-12)
        return total, total / span, peak

    def summary(self, end_s: float) -> dict:
        vals, counts = self.latencies()
        chunks = float(counts.sum()) if counts.size else 0.0
        if chunks > 0:
            on_time = float(counts[vals <= self.slo_ms + 1e-9].sum())
            late_by_ms = np.clip(vals - self.playback_ms, 0.0, None)
            stall_s = float((late_by_ms * counts).sum()) / 1000.0
            mean = float((vals * counts).sum() / chunks)
            p50 = weighted_quantile(vals, counts, 0.50)
            p99 = weighted_quantile(vals, counts, 0.99)
            p999 = weighted_quantile(vals, counts, 0.999)
            worst = float(vals.max())
            attainment = on_time / chunks
        else:
            stall_s = mean = p50 = p99 = p999 = worst = 0.0
            attainment = 1.0
        gaps = np.frombuffer(self._gap_ms, dtype=float)
        gap_n = np.frombuffer(self._gap_n, dtype=float)
        if gap_n.size and gap_n.sum() > 1:
            n = gap_n.sum()
            gmean = float((gaps * gap_n).sum() / n)
            jitter = float(math.sqrt(max(0.0, ((gaps - gmean) ** 2 * gap_n).sum() / n)))
        else:
            gmean = jitter = 0.0
        gpu_s, gpus_mean, gpus_max = self.gpu_seconds(end_s)
        gpu_hours = gpu_s / 3600.0
        dec = self.decision_ms
        return {
            "gpus_max": int(gpus_max),
            "gpus_mean": float(gpus_mean),
            "max_chunk_latency_ms": worst,
            "p50_chunk_latency_ms": p50,
            "p99_chunk_latency_ms": p99,
            "p999_chunk_latency_ms": p999,
            "mean_chunk_latency_ms": mean,
            "slo_ms": self.slo_ms,
            "slo_attainment": attainment,
            "deadline_miss_rate": 1.0 - attainment,
            "chunks": int(chunks),
            "unfinished_chunks": int(self.unfinished_chunks),
            "stall_s": stall_s,
            "delivery_interval_mean_ms": gmean,
            "jitter_ms": jitter,
            "gpu_hours": gpu_hours,
            "cost_usd": gpu_hours * self.prices.blended_usd_per_gpu_hour,
            "cost_on_demand_usd": gpu_hours * self.prices.on_demand_usd_per_gpu_hour,
            "cost_spot_usd": gpu_hours * self.prices.spot_usd_per_gpu_hour,
            "migrations": int(self.migrations),
            "migrations_aborted": int(self.migrations_aborted),
            "migration_bytes": int(self.migration_bytes),
            "migration_downtime_ms_total": float(self.migration_downtime_ms),
            "migration_downtime_ms_max": float(self.migration_downtime_max_ms),
            "offloads": int(self.offloads),
            "offload_bytes": int(self.offload_bytes),
            "resumes": int(self.restores),
            "restore_bytes": int(self.restore_bytes),
            "decision_events": int(dec.size),
            "decision_ms_p50": float(np.percentile(dec, 50)) if dec.size else 0.0,
            "decision_ms_p99": float(np.percentile(dec, 99)) if dec.size else 0.0,
            "decision_ms_max": float(dec.max()) if dec.size else 0.0,
        }
