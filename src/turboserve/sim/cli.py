"""`turboserve simulate`: replay a trace under each policy and report latency and cost.

In: the parsed arguments of `turboserve.cli` (`--trace`, `--model`, `--gpus`, `--policy`,
`--slo-ms`, `--until`, `--link`, `--json`, `--plot`, `--no-equal-cost`, `--jobs`,
`--config`, `--set`). Out: the table on stdout, the report JSON (`sim/report.py`) and PNG
plots when asked; exit code 0.

`--model` is the shape every session uses (the trace's own is overridden: its frames per
chunk and fps follow the shape's profile). `--gpus` is the fixed count of fixed-count
policies and the ceiling of autoscaling ones; the fixed-count baselines also run at
`turboserve`'s mean GPU count (`NAME@equal-cost` rows: the same cost, so their latency
is what turboserve's buys). A shape one session of which cannot meet the
SLO on one GPU is refused unless `--slo-ms` is given explicitly (and refused even then if
that SLO is still out of reach): such a run would report SLO attainment for a load no
cluster can serve.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from typing import Any

import numpy as np

from ..config import LINKS, TurboConfig, load_config
from ..policy.latency import LatencyModel
from ..policy.registry import FIXED_COUNT_BASELINES
from ..types import CompatKey, SessionRecord
from . import oracle
from .jobs import RunOutput, TaskRunner
from .report import build_report, format_table, run_entry, write_json


class SimUsageError(ValueError):
    """A problem with the command's inputs; the CLI prints it as one line (exit 2)."""


def build_config(args) -> TurboConfig:
    cfg = load_config(getattr(args, "config", None), getattr(args, "overrides", None))
    if args.gpus is not None:
        if args.gpus < 1:
            raise SimUsageError(f"--gpus must be >= 1, got {args.gpus}")
        cfg = replace(cfg, cluster=replace(cfg.cluster, gpus=int(args.gpus),
                                           min_gpus=min(cfg.cluster.min_gpus, int(args.gpus))))
    if args.slo_ms is not None:
        if args.slo_ms <= 0:
            raise SimUsageError(f"--slo-ms must be > 0, got {args.slo_ms}")
        cfg = replace(cfg, slo=replace(cfg.slo, slo_ms=float(args.slo_ms)))
    link = getattr(args, "link", None)
    if link is not None:
        if link not in LINKS:
            raise SimUsageError(f"--link {link!r} is not known; expected one of {', '.join(LINKS)}")
        cfg = replace(cfg, cluster=replace(cfg.cluster, link=link))
    for name, which in (("cluster.link", cfg.cluster.link), ("cluster.host_link", cfg.cluster.host_link)):
        if which not in LINKS:
            raise SimUsageError(f"{name}={which!r} is not known; expected one of {', '.join(LINKS)}")
    return cfg


def map_to_shape(records: list[SessionRecord], shape: str, model: LatencyModel) -> list[SessionRecord]:
    """Every session uses `shape`: its model, and the shape's chunk (frames, fps)."""
    info = model.shape(shape)
    out = []
    for r in records:
        spec = r.spec.with_(model=shape, frames_per_chunk=info.video_frames_per_chunk, fps=info.fps)
        out.append(replace(r, spec=spec))
    return out


def check_feasible(records: list[SessionRecord], model: LatencyModel, config: TurboConfig,
                   explicit_slo: bool) -> dict[CompatKey, float]:
    """SLO (ms) per compatibility group; raises SimUsageError for a group one GPU cannot
    serve within it."""
    slo_of: dict[CompatKey, float] = {}
    for r in records:
        key = r.spec.compat_key
        if key in slo_of:
            continue
        slo = config.slo.slo_ms or 1000.0 * r.spec.chunk_seconds
        slo_of[key] = slo
        cap = oracle.sessions_per_gpu(model, key, slo, config.cluster.gpu_memory_bytes)
        if cap <= 0:
            info = model.shape(key.model)
            full = model.state_bytes(key.model, info.window_frames)
            gpu_bytes = config.cluster.gpu_memory_bytes
            if full > gpu_bytes - info.weights_bytes:
                raise SimUsageError(
                    f"shape {key.model!r}: one session's state at its full window ({full / 1e9:.2f} GB) and the "
                    f"weights ({info.weights_bytes / 1e9:.2f} GB) do not fit in a GPU's {gpu_bytes / 1e9:.2f} GB "
                    f"(cluster.gpu_memory_bytes = {gpu_bytes}); no GPU count serves it")
            alone_ms = (model.round_ms(key.model, 1, info.window_frames, key.steps) + model.fixed_ms(key.model))
            if explicit_slo:
                raise SimUsageError(
                    f"shape {key.model!r}: one session needs {alone_ms:.0f} ms per chunk (or more memory than a "
                    f"GPU has), over the {slo:.0f} ms SLO; no GPU count serves it. Give a larger --slo-ms "
                    "or a profile of a faster GPU")
            raise SimUsageError(
                f"shape {key.model!r} is infeasible: one session alone needs {alone_ms:.0f} ms per chunk, over "
                f"its {slo:.0f} ms playback time (capacity 0 per GPU). Refusing to report SLO attainment "
                f"for it; pass an explicit --slo-ms (e.g. --slo-ms {int(alone_ms * 1.25)}) or a profile of a "
                "faster GPU")
    return slo_of


def policies_from(arg: str) -> list[str]:
    from ..policy.registry import get_policy, policy_names

    if arg.strip().lower() == "all":
        return policy_names()
    names = [p.strip() for p in arg.split(",") if p.strip()]
    if not names:
        raise SimUsageError("--policy is empty; give 'all' or a comma-separated list")
    for n in names:
        get_policy(n)  # raises ValueError naming the known policies
    return names


# DESIGN.md: fixed-count baselines run at the count that serves the peak (`--gpus`) and at
# the same average GPU count as `turboserve` (equal cost); their equal-cost rows carry this suffix.
EQUAL_COST = "@equal-cost"


def equal_cost_gpus(gpus_mean: float) -> int:
    """The fixed count nearest `turboserve`'s mean GPU count (halves round up), at least 1."""
    return max(1, int(math.floor(gpus_mean + 0.5)))


def run_matrix(records: list[SessionRecord], shape: str, policies: list[str], model: LatencyModel,
               config: TurboConfig, *, explicit_slo: bool, until_s: float | None = None,
               progress: bool = False, meta: dict[str, Any] | None = None,
               equal_cost: bool = True, jobs: int = 1) -> tuple[dict, list[tuple[str, RunOutput]]]:
    """Run every policy on the (shape-mapped) trace, in up to `jobs` processes (`sim/jobs.py`:
    the same figures); returns (report, (label, RunOutput) per run that finished).

    With `equal_cost`, when `turboserve` ran, the fixed-count baselines among `policies`
    run again at `equal_cost_gpus(turboserve's mean GPUs)` as `NAME@equal-cost` (unless that
    count is the ceiling: their peak rows are then the equal-cost ones); the report's
    `equal_cost` says which count that was (their runs start as soon as turboserve's ends)."""
    slo_of = check_feasible(records, model, config, explicit_slo)
    demand = oracle.nominal_demand(records, slo_of)
    mem = config.cluster.gpu_memory_bytes
    gpu_hours_lb = oracle.cost_lower_bound_gpu_hours(demand, model, slo_of, mem, end_s=until_s)
    max_batch = config.engine.max_batch
    latency_lb = oracle.latency_lower_bound_ms(demand, model, np.array([0.0]), np.array([config.cluster.gpus]),
                                               max_batch, end_s=until_s)
    runs: list[dict] = []
    results: list[tuple[str, RunOutput]] = []
    failed: list[dict] = []

    def collect(handle, extra: dict | None = None) -> None:  # noqa: ANN001 - a TaskRunner handle
        label, out, why = handle.result()
        if out is None:
            print(f"policy {label} failed: {why}", file=sys.stderr)
            failed.append({"policy": label, "error": why})
            return
        ready_t = np.array([s[0] for s in out.gpu_series])
        ready_n = np.array([s[2] for s in out.gpu_series])
        out.summary["latency_lb_ms"] = oracle.latency_lower_bound_ms(demand, model, ready_t, ready_n,
                                                                     max_batch, end_s=out.end_s)
        runs.append(run_entry(label, out.summary, extra))
        results.append((label, out))

    same_cost = None
    with TaskRunner(records, model, shape, until_s, jobs=jobs, progress=progress) as runner:
        # turboserve first: the equal-cost runs need its mean GPU count (the rows keep the order asked)
        first = sorted(policies, key=lambda p: p != "turboserve") if equal_cost else policies
        handles = {name: runner.submit((name, name, config)) for name in first}
        extra_handles = []
        ts = handles["turboserve"].result()[1] if equal_cost and "turboserve" in handles else None
        if ts is not None:
            mean = run_entry("turboserve", ts.summary)["gpus"]["mean"]
            n = equal_cost_gpus(mean)
            same_cost = {"gpus": n, "turboserve_gpus_mean": mean,
                         "policies": [p for p in policies if p in FIXED_COUNT_BASELINES]}
            if n >= config.cluster.gpus:
                same_cost["note"] = ("turboserve's mean GPU count rounds to the ceiling: the peak rows are the "
                                     "equal-cost ones")
            else:
                cfg = replace(config, cluster=replace(config.cluster, gpus=n, min_gpus=min(config.cluster.min_gpus, n)))
                extra_handles = [runner.submit((name + EQUAL_COST, name, cfg)) for name in same_cost["policies"]]
        for name in policies:
            collect(handles[name])
        for handle in extra_handles:
            collect(handle, {"gpu_count": "equal-cost"})
    report = build_report(runs, gpu_hours_lb, latency_lb, meta=meta, oracle_extra={
        "gpu_hours_lb_throughput": oracle.throughput_lower_bound_gpu_hours(records, model, slo_of, mem, max_batch),
        "latency_lb_gpus": config.cluster.gpus,
        "latency_floor_ms": oracle.latency_floor_ms(records, model, max_batch),
        "basis": "nominal active load (real-time pacing); gpu_hours_lb_throughput and latency_floor_ms "
                 "are strict under any pacing",
    })
    if same_cost is not None:
        report["equal_cost"] = same_cost
    if failed:
        report["failed"] = failed
    return report, results


def run(args) -> int:
    from ..profile import load_latency_model, resolve_shape
    from ..traces.schema import read_trace
    from .driver import warm_start_gpus

    config = build_config(args)
    model = load_latency_model()
    shape = resolve_shape(args.model, model)
    # capacity where memory binds is the simulated GPU's (the engines' pools are sized by it)
    model = model.on_gpu(config.cluster.gpu_memory_bytes)
    records = read_trace(args.trace)
    if not records:
        raise SimUsageError(f"trace {args.trace} has no sessions")
    records = map_to_shape(records, shape, model)
    policies = policies_from(args.policy)
    until_s = getattr(args, "until", None)
    if until_s is not None and until_s <= 0:
        raise SimUsageError(f"--until must be > 0 simulated seconds, got {until_s}")
    jobs = getattr(args, "jobs", 1)
    if jobs < 1:
        raise SimUsageError(f"--jobs must be at least 1 (processes to run the policies in), got {jobs}")
    explicit = args.slo_ms is not None or config.slo.slo_ms is not None
    progress = bool(config.sim.progress) and sys.stderr.isatty()
    info = model.shape(shape)
    check_feasible(records, model, config, explicit)  # before anything reads the demand
    meta = {
        "trace": str(args.trace), "shape": shape, "gpus": config.cluster.gpus,
        "slo_ms": config.slo.slo_ms or info.chunk_ms, "slo_explicit": explicit,
        "playback_ms": info.chunk_ms, "link": config.cluster.link, "sessions": len(records),
        "startup_delay_s": config.cluster.startup_delay_s, "until_s": until_s,
        "initial_gpus_autoscaling": warm_start_gpus(records, model, config, shape),
        "initial_gpus_rule": ("set (autoscale.initial_gpus)" if config.autoscale.initial_gpus > 0 else
                              "warm: the trace's demand over its first start-up delay"),
    }
    report, results = run_matrix(records, shape, policies, model, config, explicit_slo=explicit,
                                 until_s=until_s, progress=progress, meta=meta,
                                 equal_cost=getattr(args, "equal_cost", True), jobs=jobs)
    print(f"trace {args.trace}: {len(records)} sessions, shape {shape}, up to {config.cluster.gpus} GPUs, "
          f"SLO {meta['slo_ms']:.0f} ms{' (explicit)' if explicit else ' (chunk playback time)'}; "
          f"autoscalers start at {meta['initial_gpus_autoscaling']} GPUs "
          + ("(autoscale.initial_gpus)" if config.autoscale.initial_gpus > 0 else
             f"(warm: demand over the first {config.cluster.startup_delay_s:g} s)"))
    print(format_table(report))
    if args.json_out:
        write_json(report, args.json_out)
        print(f"wrote {args.json_out}")
    if args.plot:
        from .plots import write_plots

        slo_of = check_feasible(records, model, config, explicit)
        times, frac = oracle.demand_series(oracle.nominal_demand(records, slo_of), model, slo_of,
                                           config.cluster.gpu_memory_bytes)
        end_s = max((out.end_s for _, out in results), default=0.0)
        price = config.cluster.price_per_gpu_hour_usd * (1 - config.cluster.spot_fraction) + \
            config.cluster.spot_price_per_gpu_hour_usd * config.cluster.spot_fraction
        paths = write_plots(args.plot, {label: out.latencies for label, out in results},
                            {label: out.gpu_series for label, out in results},
                            {label: out.cost_usd for label, out in results}, meta["slo_ms"], end_s,
                            demand=(times, frac), lower_bound_usd=report["oracle"]["gpu_hours_lb"] * price)
        print("wrote " + ", ".join(str(p) for p in paths))
    if report.get("failed"):
        print(f"{len(report['failed'])} polic{'y' if len(report['failed']) == 1 else 'ies'} failed: "
              + ", ".join(f["policy"] for f in report["failed"]), file=sys.stderr)
        return 1
    return 0
