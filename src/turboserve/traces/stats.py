"""Summary statistics of a session trace.

In: `SessionRecord`s, optionally a latency model and shape. Out: a flat dict (sessions,
span, arrival rate, active-seconds and session-duration percentiles, active fraction,
periods per session, peak concurrently active sessions, and with a shape the peak GPUs
needed at the SLO, and where step counts mix, with each group on GPUs of its own) and a
text table of it.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..types import SessionRecord
from .rescale import peak_concurrent_active, peak_demand, peak_demand_apart


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (q in [0, 100])."""
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100.0 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def trace_stats(records: Sequence[SessionRecord], model=None, shape: str | None = None,
                slo_ms: float | None = None) -> dict:
    n = len(records)
    out: dict = {"sessions": n}
    if n == 0:
        return out
    arrivals = sorted(r.arrival_s for r in records)
    ends = [r.arrival_s + sum(p.active_s + p.idle_s for p in r.periods) for r in records]
    span = max(ends) - arrivals[0]
    active = sorted(r.active_seconds for r in records)
    wall = sorted(sum(p.active_s + p.idle_s for p in r.periods) for r in records)
    arrival_span = arrivals[-1] - arrivals[0]
    out.update(
        first_arrival_s=arrivals[0],
        last_arrival_s=arrivals[-1],
        span_s=span,
        arrivals_per_min=(60.0 * (n - 1) / arrival_span) if arrival_span > 0 else float("nan"),
        active_s_p50=percentile(active, 50),
        active_s_p90=percentile(active, 90),
        active_s_p99=percentile(active, 99),
        active_s_max=active[-1],
        duration_s_p50=percentile(wall, 50),
        duration_s_p99=percentile(wall, 99),
        active_fraction=sum(active) / sum(wall) if sum(wall) > 0 else 1.0,
        periods_per_session=sum(len(r.periods) for r in records) / n,
        multi_period_sessions=sum(1 for r in records if len(r.periods) > 1),
        peak_concurrent_active=peak_concurrent_active(records),
        steps_mix={str(s): sum(1 for r in records if r.spec.steps == s) for s in sorted({r.spec.steps for r in records})},
        models=sorted({r.spec.model for r in records}),
    )
    if model is not None and shape is not None:
        peak, at = peak_demand(records, model, shape, slo_ms)
        out.update(shape=shape, slo_ms=slo_ms if slo_ms is not None else model.shape(shape).chunk_ms,
                   peak_gpus=math.ceil(peak - 1e-9), peak_gpus_exact=peak, peak_at_s=at)
        if len(out["steps_mix"]) > 1:  # several coalescing groups: each on GPUs of its own
            out.update(peak_gpus_groups_apart=peak_demand_apart(records, model, shape, slo_ms))
    return out


def format_stats(stats: dict) -> str:
    lines = []
    for k, v in stats.items():
        if isinstance(v, float):
            v = f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
        lines.append(f"{k:<24} {v}")
    return "\n".join(lines)
