"""The simulation report: one row per policy, plus the oracle bounds.

In: each policy's name, its `RunMetrics.summary(...)` dict, and the oracle bounds.
Out: `build_report(...)` -> the JSON document
`{"runs": [{"policy", "gpus": {"max", "mean"}, "metrics": {...}}], "oracle": {...}}`
(the keys scripts rely on are `REQUIRED_METRICS` and `REQUIRED_ORACLE`; more sit beside
them, e.g. `equal_cost`: the GPU count the fixed-count baselines ran at again to match
turboserve's cost), `format_table(report)` -> the printed table, and `write_json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REQUIRED_METRICS = (
    "max_chunk_latency_ms",
    "p99_chunk_latency_ms",
    "p999_chunk_latency_ms",
    "slo_attainment",
    "gpu_hours",
    "cost_usd",
    "migrations",
    "offloads",
    "decision_ms_p50",
    "decision_ms_p99",
)
REQUIRED_ORACLE = ("gpu_hours_lb", "latency_lb_ms")


def run_entry(policy: str, summary: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
    """One element of `runs`: the summary's GPU counts lifted into `gpus`, the rest in `metrics`."""
    missing = [k for k in REQUIRED_METRICS if k not in summary]
    if missing:
        raise ValueError(f"run {policy!r}: summary lacks {missing}")
    metrics = {k: _finite(v) for k, v in summary.items() if k not in ("gpus_max", "gpus_mean")}
    entry = {
        "policy": policy,
        "gpus": {"max": int(summary.get("gpus_max", 0)), "mean": float(summary.get("gpus_mean", 0.0))},
        "metrics": metrics,
    }
    if extra:
        entry.update(extra)
    return entry


def build_report(runs: list[dict], gpu_hours_lb: float, latency_lb_ms: float,
                 meta: dict[str, Any] | None = None, oracle_extra: dict[str, Any] | None = None) -> dict:
    oracle = {"gpu_hours_lb": float(_finite(gpu_hours_lb)), "latency_lb_ms": float(_finite(latency_lb_ms))}
    if oracle_extra:
        oracle.update({k: _finite(v) for k, v in oracle_extra.items()})
    report: dict[str, Any] = {"runs": runs, "oracle": oracle}
    if meta:
        report["meta"] = meta
    return report


def _finite(v: Any) -> Any:
    """JSON has no NaN/inf: an unbounded value becomes None and the table shows '-'."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


COLUMNS = (
    # header, getter, format
    ("policy", lambda r: r["policy"], "{}"),
    ("GPUs max", lambda r: r["gpus"]["max"], "{:d}"),
    ("GPUs mean", lambda r: r["gpus"]["mean"], "{:.2f}"),
    ("max ms", lambda r: r["metrics"]["max_chunk_latency_ms"], "{:.0f}"),
    ("p99 ms", lambda r: r["metrics"]["p99_chunk_latency_ms"], "{:.0f}"),
    ("p99.9 ms", lambda r: r["metrics"]["p999_chunk_latency_ms"], "{:.0f}"),
    ("SLO %", lambda r: 100.0 * r["metrics"]["slo_attainment"], "{:.2f}"),
    ("stall s", lambda r: r["metrics"].get("stall_s", 0.0), "{:.1f}"),
    ("GPU-h", lambda r: r["metrics"]["gpu_hours"], "{:.2f}"),
    ("cost $", lambda r: r["metrics"]["cost_usd"], "{:.2f}"),
    ("migr", lambda r: r["metrics"]["migrations"], "{:d}"),
    ("offl", lambda r: r["metrics"]["offloads"], "{:d}"),
    ("dec p99 ms", lambda r: r["metrics"]["decision_ms_p99"], "{:.3f}"),
)


def format_table(report: dict) -> str:
    rows = [[h for h, _, _ in COLUMNS]]
    for run in report["runs"]:
        row = []
        for _, get, fmt in COLUMNS:
            v = get(run)
            row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    o = report["oracle"]
    lb_h = o.get("gpu_hours_lb")
    lb_ms = o.get("latency_lb_ms")
    lines.append("")
    thr = o.get("gpu_hours_lb_throughput")
    lines.append((f"oracle: cost lower bound {lb_h:.2f} GPU-h (nominal active load)" if lb_h is not None
                  else "oracle: cost lower bound -")
                 + (f"; {thr:.2f} GPU-h from throughput alone" if isinstance(thr, (int, float)) else ""))
    floor = o.get("latency_floor_ms")
    lines.append((f"oracle: latency lower bound {lb_ms:.0f} ms at the GPU ceiling"
                  if lb_ms is not None else "oracle: latency lower bound -")
                 + (f"; {floor:.0f} ms floor (each session's last chunk alone)"
                    if isinstance(floor, (int, float)) else ""))
    same = report.get("equal_cost")
    if same and same.get("policies"):
        lines.append(f"equal cost: {', '.join(same['policies'])} "
                     + (f"again at {same['gpus']} GPUs (@equal-cost), turboserve's mean "
                        f"{same['turboserve_gpus_mean']:.2f} rounded" if "note" not in same else
                        f"at {same['gpus']} GPUs are the peak rows (turboserve's mean "
                        f"{same['turboserve_gpus_mean']:.2f} rounds to the ceiling)"))
    return "\n".join(lines)


def write_json(report: dict, path: str | Path) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
        f.write("\n")
