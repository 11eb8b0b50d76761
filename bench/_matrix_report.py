"""The simulation matrix's report: its table, its averages, merging results files, the JSON.

In: cells as `bench/sim_matrix.py` makes them (dicts: the cell's key, its reductions and
the runs' figures), or results files of earlier runs. Out: a printed table of every cell,
the averages over the cells (and each seed's own, with several seeds), and the JSON file.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


def _change(reduction) -> str:
    """A reduction shown as the signed change: a 40% reduction prints as -40.0%."""
    return "-" if reduction is None else f"{-100 * reduction:+.1f}%"


def _equal_latency(eq: dict | None, reduction) -> str:
    """The cost change vs autoscale-only at equal worst-case latency, with the target share
    used; `never` when no rung reached turboserve's worst chunk (vs its best rung)."""
    if not eq:
        return "-"
    return f"{_change(reduction)} @{eq['target_capacity_fraction']:g}" + ("" if eq["reached"] else " never")


def _served(c: dict) -> str:
    """The cost change vs static-ll at the count that serves the trace within the SLO, with
    that count; `never` when no count tried did (up to 2N)."""
    served = c.get("static_ll_serving")
    if not served:
        return "-"
    if not served["reached"]:
        return "never"
    ok = c.get("turboserve_latency_ok_vs_peak_served")
    return f"{_change(c['cost_reduction_vs_peak_served'])} @{served['gpus']}" + ("" if ok else " (worse max)")


def format_rows(cells: list[dict]) -> str:
    head = ("shape", "GPUs", "trace", "seed", "sess", "max lat vs LL", "max lat vs RR", "cost vs peak", "vs LL serving", "cost vs auto",
            "vs auto@=max", "oracle gap", "same cost: GPUs", "max lat vs LL", "SLO ts", "SLO ts-na", "wall s")
    rows = [head]
    for c in cells:
        if c.get("failed"):
            rows.append((c["shape"], str(c["gpus"]), c["trace"], str(c.get("seed", 0)), str(c["sessions"]),
                         "failed: " + ",".join(f["policy"] for f in c["failed"]), "", "", "", "", "", "", "", "", "", "",
                         f"{c['wall_s']:.0f}"))
            continue
        rows.append((c["shape"] + ("*" if c["slo_explicit"] else ""), str(c["gpus"]), c["trace"],
                     str(c.get("seed", 0)), str(c["sessions"]),
                     _change(c["latency_reduction_vs_static_ll"]), _change(c["latency_reduction_vs_static_rr"]),
                     _change(c["cost_reduction_vs_peak_fixed"]) + ("" if c["turboserve_latency_ok_vs_peak_fixed"] else " (worse max)"),
                     _served(c),
                     _change(c["cost_reduction_vs_autoscale_only"]) + ("" if c["turboserve_latency_ok_vs_autoscale_only"] else " (worse max)"),
                     _equal_latency(c.get("autoscale_only_equal_latency"), c.get("cost_reduction_vs_autoscale_only_equal_latency")),
                     _pct(c["oracle_gap"]), str(c.get("equal_cost_gpus") or "-"),
                     _change(c.get("latency_reduction_at_equal_cost_vs_static_ll")),
                     f"{100 * c['slo_attainment']['turboserve']:.2f}%",
                     f"{100 * c['slo_attainment']['turboserve-no-autoscale']:.2f}%", f"{c['wall_s']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def _median(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def averages(cells: list[dict]) -> dict:
    cells = [c for c in cells if not c.get("failed")]
    above = [c for c in cells if not c.get("baselines_on_floor")]
    reached = [c for c in cells if (c.get("autoscale_only_equal_latency") or {}).get("reached")]
    served = [c for c in cells if (c.get("static_ll_serving") or {}).get("reached")]
    searched = [c for c in cells if c.get("static_ll_serving")]
    unreached = [c for c in cells if c.get("autoscale_only_equal_latency") and c not in reached]

    def mean(key, among=cells):
        return _mean([c.get(key) for c in among if c.get(key) is not None])
    return {k: mean(k) for k in ("latency_reduction_vs_static_ll", "latency_reduction_vs_static_rr",
                                  "cost_reduction_vs_peak_fixed", "cost_reduction_vs_autoscale_only", "oracle_gap",
                                  "latency_reduction_at_equal_cost_vs_static_ll",
                                  "latency_reduction_at_equal_cost_vs_static_rr")} | {
        # the cells where scheduling can change the worst chunk (a baseline is above the floor)
        "latency_reduction_vs_static_ll_above_floor": mean("latency_reduction_vs_static_ll", above),
        "latency_reduction_vs_static_rr_above_floor": mean("latency_reduction_vs_static_rr", above),
        "cells_above_floor": len(above),
        # over the cells where autoscale-only reached turboserve's worst chunk on some rung of
        # LADDER; where none did, turboserve is faster at any cost and the figure is against the
        # rung of autoscale-only's best worst chunk
        "cost_reduction_vs_autoscale_only_equal_latency": mean("cost_reduction_vs_autoscale_only_equal_latency", reached),
        "cells_autoscale_only_reached_equal_latency": len(reached),
        "cost_reduction_vs_autoscale_only_best_rung_unreached": mean(
            "cost_reduction_vs_autoscale_only_equal_latency", unreached),
        # and how far above turboserve's worst chunk autoscale-only's best one stays there (the
        # median: where sessions queue for a GPU, as wan14b-480p's do, it is 10-40x)
        "autoscale_only_best_max_over_turboserve_unreached_median": _median(
            [c["autoscale_only_equal_latency"]["max_chunk_latency_ms"] / c["max_chunk_latency_ms"]["turboserve"] - 1
             for c in unreached if c["max_chunk_latency_ms"]["turboserve"] > 0]),
        # against DESIGN.md's `peak`: the count at which static-ll serves the trace within the
        # SLO, over the cells where some count up to 2N does; and over every searched cell
        # with N where none does (a lower bound there: the count that would serve is above 2N)
        "cost_reduction_vs_peak_served": mean("cost_reduction_vs_peak_served", served),
        "cells_peak_served_reached": len(served) if searched else None,
        "cost_reduction_vs_peak_served_else_n": _mean([
            c["cost_reduction_vs_peak_served"] if c in served else c["cost_reduction_vs_peak_fixed"]
            for c in searched if c.get("cost_reduction_vs_peak_fixed") is not None]),
        "slo_attainment_turboserve_min": min((c["slo_attainment"]["turboserve"] for c in cells), default=None)}


def _average(key: str, v) -> str:
    if key == "oracle_gap" or "_over_" in key:
        return _pct(v)
    if "slo" in key:
        return f"{100 * v:.2f}%"
    return str(v) if key.startswith("cells") else _change(v)


def merged(paths: list[str]) -> tuple[float, list[dict], dict]:
    """The cells of several results files of one matrix (same simulated hours, no cell and
    seed twice), in file order."""
    hours, cells, notes, seen = None, [], {}, set()
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if hours is not None and data["hours"] != hours:
            raise ValueError(f"{path} simulated {data['hours']} h, the files before it {hours} h: not one matrix")
        hours = data["hours"]
        notes |= data.get("notes", {})
        for c in data["cells"]:
            c.setdefault("seed", 0)  # files from before --seeds ran seed 0
            key = (c["shape"], c["gpus"], c["trace"], c["seed"])
            if key in seen:
                raise ValueError(f"{path}: cell {key} is already in an earlier file")
            seen.add(key)
            cells.append(c)
    return hours, cells, notes


def write_results(cells: list[dict], hours: float, notes: dict, json_out: str,
                  policies: tuple[str, ...]) -> int:
    """The table of every cell, the averages (and each seed's, with several), the JSON."""
    print()
    print(format_rows(cells))
    avg = averages(cells)
    print("\naverages (reductions as signed changes; the paper: -37.5% latency, -37.2% cost): " + ", ".join(
        f"{k} {_average(k, v)}" for k, v in avg.items() if v is not None))
    seeds = sorted({c.get("seed", 0) for c in cells})
    if len(seeds) > 1:
        # how far one draw's averages stray from another's: what a single-seed figure is worth
        avg["per_seed"] = {str(seed): averages([c for c in cells if c.get("seed", 0) == seed]) for seed in seeds}
        for seed, a in avg["per_seed"].items():
            print(f"seed {seed}: " + ", ".join(f"{k} {_average(k, v)}" for k, v in a.items() if v is not None))
    out = {"hours": hours, "seeds": seeds, "policies": list(policies),
           "cells": [{k: v for k, v in c.items() if k != "report"} | {"report": c["report"]} for c in cells],
           "averages": avg, "notes": notes}
    Path(json_out).parent.mkdir(parents=True, exist_ok=True)
    with open(json_out, "w") as f:
        json.dump(out, f, indent=1, allow_nan=False, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else v)
    print(f"wrote {json_out}")
    return 0
