"""The simulation matrix: model shapes x cluster sizes x traces, TurboServe against baselines.

For each cell (shape, GPUs N, trace) the trace is made (synthetic bursty, Mooncake,
ServeGen) and fitted so its peak demand needs N GPUs of the shape (`--fit-gpus`) within the
simulated hours: each trace keeps its time axis over those hours and is fitted by sampling
its sessions, or overlaying jittered copies where too small (`--span-hours`,
`traces.span_fit`); the synthetic and ServeGen ones are drawn at a rate whose peak exceeds
N. Fitting by moving arrivals instead stretched Mooncake to 37 h for wan14b-480p at 32 GPUs
(a one-hour replay saw 3% of it) and squeezed it into 4 min for demo91 at 64 GPUs. Then it is
replayed under `static-rr`, `static-ll`, `turboserve-no-autoscale` (fixed N GPUs: the count
whose perfect packing serves the peak) and `turboserve`, `autoscale-only` (ceiling N).
Reported per cell:
- worst-case latency reduction of turboserve-no-autoscale vs static-ll and vs static-rr;
- cost reduction of turboserve vs the fixed count N (static-ll at N) and vs
  autoscale-only, with whether turboserve's worst case is equal or better there;
- cost reduction vs DESIGN.md's `peak`, the count at which static-ll serves the trace within
  the SLO (>= 99.9% of chunks on time, none later than 2 SLOs): searched from N up or down
  (`_matrix_search`); N's perfect packing is not what static-ll's placement achieves. None
  where no count up to 2N serves;
- cost reduction of turboserve vs autoscale-only *at equal or better worst-case latency*:
  autoscale-only runs again with its per-GPU target lowered down `LADDER` (a share of the
  capacity at the SLO: `autoscale.target_capacity_fraction`, as one lowers Ray Serve's
  target_ongoing_requests) until its worst chunk is no worse than turboserve's. Its worst
  chunk comes from the upscale and start-up delays a burst waits out, so some cells never
  get there within the ceiling: those are compared with the rung of its best worst chunk
  and flagged (turboserve is then both cheaper and faster, by at least that much);
- turboserve's gap to the oracle cost lower bound; SLO attainment;
- at equal cost (DESIGN.md's `equal-cost` count): static-ll and static-rr again at
  turboserve's mean GPU count, and turboserve's worst-case latency reduction against them
  (what its cost buys; where that count rounds to N, against their peak rows).
The averages come over every cell, and for latency also over the cells where a baseline's
worst chunk is above the oracle's latency floor (a session's last chunk run alone): where
both baselines sit on it, as most wan14b-480p cells do, no policy can reduce it.

wan14b-480p cannot meet the 750 ms playback SLO on an H100 (one session alone needs about
2 s per chunk); it runs with the explicit SLO `--wan14b-slo-ms` (default 2600 ms), which
the output states. Its traces are fitted with each chunk taking that SLO, not its playback
time (`traces.rescale.slo_pace`): fitted on playback times they needed 3.5x the GPUs the
fit assumed, and every policy queued sessions for minutes.

    python bench/sim_matrix.py --quick                  # one small cell, into runs/sim_matrix-quick.json
    python bench/sim_matrix.py --shapes demo91 --gpus 8,16 --hours 0.5 --json out.json
    python bench/sim_matrix.py --shapes demo91 --set autoscale.spare_fraction=0.125 --json out.json
    python bench/sim_matrix.py --jobs 2                 # cells in 2 processes (they are independent)
    python bench/sim_matrix.py --seeds 0,1 --jobs 2     # every cell on two draws of its trace
    python bench/sim_matrix.py --merge a.json b.json --json all.json  # parts run apart, averaged as one
    python bench/sim_matrix.py --add-peak-search bench/results/sim_matrix.json --jobs 2
                                                        # only static-ll's serving-count search, added to
                                                        # the cells of a results file (its runs kept;
                                                        # in place unless --json says where)
    python bench/sim_matrix.py --traces synthetic-mixed --seeds 0,1 --json bench/results/sim_matrix_mixed.json
                                                        # half the sessions at 2 steps: two groups

Prints a table and writes JSON (`--json`, default bench/results/sim_matrix.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from _args import int_list, name_list  # noqa: E402
from _matrix_search import autoscale_only_at_latency, static_ll_serving_count  # noqa: E402
from _matrix_report import format_rows, merged, write_results  # noqa: E402
from turboserve.cli import main as turboserve_main  # noqa: E402
from turboserve.config import load_config  # noqa: E402
from turboserve.profile import load_latency_model  # noqa: E402
from turboserve.sim.cli import EQUAL_COST, map_to_shape, run_matrix  # noqa: E402
from turboserve.traces.schema import read_trace  # noqa: E402

SHARED = REPO.parent / "shared" / "traces"
SHAPES = ("demo91", "wan1.3b-320p", "wan14b-480p")
CLUSTERS = (8, 16, 32, 64)
TRACES = ("synthetic", "mooncake", "servegen")
# beyond the matrix (`--traces synthetic-mixed`): the synthetic trace with half its sessions
# at 2 denoising steps, so two coalescing groups share the cluster
MIXED_STEPS = "4:0.5,2:0.5"
TRACE_KINDS = TRACES + ("synthetic-mixed",)
POLICIES = ("static-rr", "static-ll", "turboserve-no-autoscale", "turboserve", "autoscale-only")
INFEASIBLE_AT_PLAYBACK = {"wan14b-480p"}
FLOOR_TOLERANCE = 0.001  # a worst chunk within 0.1% of the oracle's latency floor is on it


def synth_rate_per_min(model, shape: str, gpus: int, slo_ms: float | None) -> float:
    """An arrival rate whose peak comfortably exceeds `gpus` GPUs (the fit then keeps a share
    of the sessions): ~8 arrivals per minute per 22 sessions of per-GPU capacity."""
    cap = max(1, model.capacity(shape, slo_ms or model.shape(shape).chunk_ms, model.shape(shape).passes - 1))
    return max(1.0, 8.0 * gpus * cap / 22.0)


def make_trace(kind: str, shape: str, gpus: int, hours: float, seed: int, slo_ms: float | None,
               cache: Path, model) -> Path:
    """A trace file fitted to `gpus` GPUs of `shape`, made once with `turboserve trace`."""
    out = cache / f"{kind}-{shape}-{gpus}g-{hours:g}h-s{seed}-span{'' if slo_ms is None else f'-slo{slo_ms:g}'}.jsonl"
    if out.exists():
        return out
    common = ["--out", str(out), "--model", shape, "--fit-gpus", str(gpus), "--span-hours", str(hours),
              "--seed", str(seed)]
    if slo_ms is not None:
        common += ["--set", f"slo.slo_ms={slo_ms}"]
    if kind in ("synthetic", "synthetic-mixed"):
        rate = synth_rate_per_min(model, shape, gpus, slo_ms)
        argv = ["trace", "synth", "--hours", str(hours), "--rate", f"{rate:.3f}", *common]
        if kind == "synthetic-mixed":
            argv += ["--steps-mix", MIXED_STEPS]
    elif kind == "mooncake":
        argv = ["trace", "convert", "--format", "mooncake", *common, str(SHARED / "mooncake-conversation.jsonl")]
    elif kind == "servegen":
        files = sorted((SHARED / "servegen-m-small").glob("*.csv"))
        rate = synth_rate_per_min(model, shape, gpus, slo_ms)
        argv = ["trace", "convert", "--format", "servegen", "--hours", str(hours), "--rate", f"{rate:.3f}",
                *common, *map(str, files)]
    else:
        raise ValueError(f"unknown trace kind {kind!r}; expected one of {TRACE_KINDS}")
    rc = turboserve_main(argv)
    if rc != 0:
        raise RuntimeError(f"making the {kind} trace failed: turboserve {' '.join(argv)}")
    return out


def _reduction(new: float, old: float) -> float | None:
    """1 - new/old: 0.4 = 40% lower. None when the baseline is 0."""
    return None if old <= 0 else 1.0 - new / old


def _cell_inputs(shape: str, gpus: int, kind: str, hours: float, seed: int, slo_ms: float | None,
                 cache: Path, model, extra: tuple[str, ...]) -> tuple[list, object]:
    """The cell's session records (its trace made, or read from `cache`) and its config."""
    path = make_trace(kind, shape, gpus, hours, seed, slo_ms, cache, model)
    overrides = [f"cluster.gpus={gpus}", "sim.progress=false", *extra]
    if slo_ms is not None:
        overrides.append(f"slo.slo_ms={slo_ms}")
    return map_to_shape(read_trace(path), shape, model), load_config(None, overrides)


def run_cell(shape: str, gpus: int, kind: str, hours: float, seed: int, slo_ms: float | None,
             cache: Path, model, extra: tuple[str, ...] = ()) -> dict:
    records, config = _cell_inputs(shape, gpus, kind, hours, seed, slo_ms, cache, model, extra)
    t0 = time.perf_counter()
    report, _ = run_matrix(records, shape, list(POLICIES), model, config, explicit_slo=slo_ms is not None,
                           until_s=hours * 3600.0)
    wall = time.perf_counter() - t0
    by = {r["policy"]: r["metrics"] | {"gpus_max": r["gpus"]["max"], "gpus_mean": r["gpus"]["mean"]}
          for r in report["runs"]}
    if report.get("failed"):
        # a crashed policy leaves the cell incomplete; report it rather than lose the matrix
        return {"shape": shape, "gpus": gpus, "trace": kind, "seed": seed, "sessions": len(records), "wall_s": wall,
                "slo_explicit": slo_ms is not None, "failed": report["failed"], "report": report}
    ts, tna = by["turboserve"], by["turboserve-no-autoscale"]
    ll, rr, auto = by["static-ll"], by["static-rr"], by["autoscale-only"]
    # the baselines at turboserve's mean GPU count (the peak rows when that is the ceiling)
    ll_eq, rr_eq = by.get("static-ll" + EQUAL_COST, ll), by.get("static-rr" + EQUAL_COST, rr)
    lb = report["oracle"]["gpu_hours_lb"]
    auto_eq = autoscale_only_at_latency(records, shape, model, config, until_s=hours * 3600.0, default=auto,
                                        target_ms=ts["max_chunk_latency_ms"])
    slo = slo_ms or model.shape(shape).chunk_ms
    served = static_ll_serving_count(records, shape, model, config, until_s=hours * 3600.0, gpus=gpus, at_n=ll,
                                     slo_ms=slo)
    wall = time.perf_counter() - t0
    # Both baselines' worst chunk is a session's last chunk run alone: no policy can do better
    floor = report["oracle"].get("latency_floor_ms") or 0.0
    on_floor = max(ll["max_chunk_latency_ms"], rr["max_chunk_latency_ms"]) <= floor * (1 + FLOOR_TOLERANCE)
    return {
        "shape": shape, "gpus": gpus, "trace": kind, "seed": seed, "sessions": len(records),
        "slo_ms": slo,
        "slo_explicit": slo_ms is not None, "wall_s": wall,
        "latency_reduction_vs_static_ll": _reduction(tna["max_chunk_latency_ms"], ll["max_chunk_latency_ms"]),
        "latency_reduction_vs_static_rr": _reduction(tna["max_chunk_latency_ms"], rr["max_chunk_latency_ms"]),
        "cost_reduction_vs_peak_fixed": _reduction(ts["gpu_hours"], ll["gpu_hours"]),
        "cost_reduction_vs_autoscale_only": _reduction(ts["gpu_hours"], auto["gpu_hours"]),
        "turboserve_latency_ok_vs_peak_fixed": ts["max_chunk_latency_ms"] <= ll["max_chunk_latency_ms"],
        "turboserve_latency_ok_vs_autoscale_only": ts["max_chunk_latency_ms"] <= auto["max_chunk_latency_ms"],
        "cost_reduction_vs_autoscale_only_equal_latency": _reduction(ts["gpu_hours"], auto_eq["gpu_hours"]),
        "autoscale_only_equal_latency": auto_eq,
        **served_fields(ts, served),
        "oracle_gap": None if lb <= 0 else ts["gpu_hours"] / lb - 1.0,
        "equal_cost_gpus": report.get("equal_cost", {}).get("gpus"),
        "latency_reduction_at_equal_cost_vs_static_ll": _reduction(ts["max_chunk_latency_ms"],
                                                                   ll_eq["max_chunk_latency_ms"]),
        "latency_reduction_at_equal_cost_vs_static_rr": _reduction(ts["max_chunk_latency_ms"],
                                                                   rr_eq["max_chunk_latency_ms"]),
        "slo_attainment_at_equal_cost": {"static-ll": ll_eq["slo_attainment"], "static-rr": rr_eq["slo_attainment"]},
        "latency_floor_ms": floor,
        "baselines_on_floor": on_floor,
        "slo_attainment": {p: by[p]["slo_attainment"] for p in POLICIES},
        "max_chunk_latency_ms": {p: by[p]["max_chunk_latency_ms"] for p in POLICIES},
        "gpu_hours": {p: by[p]["gpu_hours"] for p in POLICIES},
        "oracle": report["oracle"],
        "report": report,
    }


def served_fields(ts: dict, served: dict) -> dict:
    """A cell's comparison with static-ll at the count that serves its trace within the SLO
    (`static_ll_serving_count`; none where no count up to 2N does)."""
    ok = served["reached"]
    return {"static_ll_serving": served,
            "cost_reduction_vs_peak_served": _reduction(ts["gpu_hours"], served["gpu_hours"]) if ok else None,
            "turboserve_latency_ok_vs_peak_served":
                ts["max_chunk_latency_ms"] <= served["max_chunk_latency_ms"] if ok else None}


def add_peak_search(cell: dict, hours: float, cache: Path, model, extra: tuple[str, ...] = ()) -> dict:
    """A cell of an earlier results file with the static-ll serving-count search added: its
    runs are kept as recorded (static-ll at N is the search's first count), only the
    search's own runs are made (`--add-peak-search`)."""
    if cell.get("failed"):
        return cell
    shape, gpus = cell["shape"], cell["gpus"]
    records, config = _cell_inputs(shape, gpus, cell["trace"], hours, cell["seed"],
                                   cell["slo_ms"] if cell["slo_explicit"] else None, cache, model, extra)
    runs = {r["policy"]: r["metrics"] for r in cell["report"]["runs"]}
    t0 = time.perf_counter()
    served = static_ll_serving_count(records, shape, model, config, until_s=hours * 3600.0, gpus=gpus,
                                     at_n=runs["static-ll"], slo_ms=cell["slo_ms"])
    print(f"cell {shape} x {gpus} GPUs x {cell['trace']} seed {cell['seed']}: static-ll serves at "
          f"{served['gpus'] if served['reached'] else 'no count tried'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return cell | served_fields(runs["turboserve"], served)


_MODEL = None


def _added_peak_search(spec: tuple) -> dict:
    return add_peak_search(*spec[:3], _MODEL, spec[3])


def _cell_or_failure(spec: tuple) -> dict:
    """One cell (in a worker process with `--jobs`); a failure is reported, not raised: one
    cell's failure must not lose the matrix."""
    global _MODEL
    shape, gpus, kind, hours, seed, slo, cache, extra = spec
    if _MODEL is None:
        _MODEL = load_latency_model()
    print(f"cell {shape} x {gpus} GPUs x {kind} ...", flush=True)
    try:
        return run_cell(shape, gpus, kind, hours, seed, slo, cache, _MODEL, extra)
    except Exception as e:  # noqa: BLE001
        print(f"cell {shape} x {gpus} GPUs x {kind} failed: {type(e).__name__}: {e}", flush=True)
        return {"shape": shape, "gpus": gpus, "trace": kind, "seed": seed, "sessions": 0, "wall_s": 0.0,
                "slo_explicit": slo is not None, "failed": [{"policy": "(trace)", "error": f"{type(e).__name__}: {e}"}],
                "report": None}


class _Serial:
    """`--jobs 1`: the pool interface, in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small cell: demo91, 8 GPUs, synthetic, 0.25 h")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--gpus", default=",".join(map(str, CLUSTERS)))
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--hours", type=float, default=1.0, help="simulated duration per trace (s of arrivals and run)")
    ap.add_argument("--seeds", default="0",
                    help="trace seeds, comma-separated: every cell runs once per seed (its trace drawn, "
                         "sampled and jittered anew) and the averages are over all of them, with each "
                         "seed's own averages beside them")
    ap.add_argument("--jobs", type=int, default=1, help="cells run in this many processes (one core each)")
    ap.add_argument("--wan14b-slo-ms", type=float, default=2600.0,
                    help="explicit SLO for wan14b-480p (infeasible at its 750 ms playback time on an H100)")
    ap.add_argument("--cache", default=str(REPO / "runs" / "bench-traces"), help="where made traces are kept (git-ignored)")
    ap.add_argument("--json", dest="json_out", default=None,
                    help="results file (default bench/results/sim_matrix.json; with --quick "
                         "runs/sim_matrix-quick.json, so a quick check leaves the committed results alone)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override for every run, e.g. autoscale.spare_fraction=0.125 (repeatable)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="run nothing: join these results files (parts of one matrix, e.g. other traces or "
                         "seeds) and average them as one")
    ap.add_argument("--add-peak-search", metavar="JSON",
                    help="run only the search for the count at which static-ll serves each cell's trace within "
                         "the SLO, for the cells of this results file (their other runs kept as recorded; pass "
                         "the --set it ran with), and write them with it to --json (default: this file)")
    args = ap.parse_args(argv)
    if args.json_out is None and args.add_peak_search:
        args.json_out = args.add_peak_search  # the file searched is updated in place
    if args.json_out is None:
        args.json_out = str(REPO / "runs" / "sim_matrix-quick.json" if args.quick
                            else REPO / "bench" / "results" / "sim_matrix.json")
    if args.merge:
        try:
            hours, cells, notes = merged(args.merge)
        except ValueError as e:
            ap.error(str(e))
        return write_results(cells, hours, notes, args.json_out, POLICIES)
    global _MODEL
    model = _MODEL = load_latency_model()  # forked workers inherit it
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.add_peak_search:
        try:
            hours, cells, notes = merged([args.add_peak_search])
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--add-peak-search {args.add_peak_search}: {e}")
        specs = [(c, hours, Path(args.cache), tuple(args.set)) for c in cells]
        with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else _Serial() as pool:
            cells = list(pool.map(_added_peak_search, specs))
        return write_results(cells, hours, notes, args.json_out, POLICIES)
    shapes = name_list(ap, "--shapes", args.shapes, model.shapes())
    clusters = int_list(ap, "--gpus", args.gpus, least=1)
    traces = name_list(ap, "--traces", args.traces, TRACE_KINDS)
    seeds = int_list(ap, "--seeds", args.seeds, least=0)
    hours = args.hours
    if args.quick:
        shapes, clusters, traces, hours = ["demo91"], [8], ["synthetic"], 0.25
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    specs = []
    for shape in shapes:
        slo = args.wan14b_slo_ms if shape in INFEASIBLE_AT_PLAYBACK else None
        if slo is not None:
            print(f"{shape}: infeasible at its {model.shape(shape).chunk_ms:.0f} ms playback time on the profiled "
                  f"H100; running with an explicit SLO of {slo:.0f} ms (marked *)", flush=True)
        specs += [(shape, gpus, kind, hours, seed, slo, cache, tuple(args.set))
                  for seed in seeds for gpus in clusters for kind in traces]
    cells = []
    # cells are independent and deterministic: in parallel they give the same figures
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else _Serial() as pool:
        for cell in pool.map(_cell_or_failure, specs):
            cells.append(cell)
            print(format_rows([cell]), flush=True)
    notes = {s: f"explicit SLO {args.wan14b_slo_ms:.0f} ms (infeasible at playback time)"
             for s in shapes if s in INFEASIBLE_AT_PLAYBACK}
    return write_results(cells, hours, notes, args.json_out, POLICIES)


if __name__ == "__main__":
    sys.exit(main())
