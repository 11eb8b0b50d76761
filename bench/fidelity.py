"""Simulator fidelity: one trace replayed in `simulate` and against the live server.

In: a latency profile of this machine (`--profile F`, else `turboserve profile --model tiny`
is run first), a short bursty trace (`--sessions`, `--seed`, or `--trace F`), the number of
CPU engines. Steps: a calibration replay of another trace (seed + 1) against the live server
times its rounds, and `profile/calibrate.py` fits the profile to them (median slow-down
and round-time jitter); then the trace is replayed against the live server (clients in a
`turboserve loadgen` process, as a real client would be) and simulated with the profile as
measured and as calibrated (rounds begun beside another engine drawn from their own
distribution; side by side, one distribution for all rounds). Out: a table of p50/p99/mean
per-chunk latency and SLO attainment for the simulations, the live server as its clients
saw it, and the live server's own per-chunk latencies (due -> delivered, the simulator's
definition), with each row's relative error against the live clients; `--json OUT` writes
the same numbers and the calibrated profile next to it. The trace is replayed live
`--live-repeats` times: the "live again" rows are the same replay run again, their error
how much the live server moves by itself between identical runs on this machine.

    python bench/fidelity.py --workers 2 --sessions 8 --repeat 4 --json runs/fidelity.json

The target (issue 4) is agreement within 10% on p50 and p99 (the calibrated simulation).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=None, help="tiny profile JSON (default: measure one now)")
    ap.add_argument("--trace", default=None, help="session trace JSONL (default: a synthetic burst)")
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sim-seeds", type=int, default=10,
                    help="calibrated simulations draw round times: report the mean over this many seeds")
    ap.add_argument("--repeat", type=int, default=4,
                    help="replay the trace this many times back to back (more chunks: a p99 that is not "
                         "one or two chunks)")
    ap.add_argument("--live-repeats", type=int, default=2,
                    help="replay the trace live this many times: the second and later runs show how much "
                         "the live server itself moves between two identical replays (the yardstick for the "
                         "simulator's error)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--policy", default="turboserve")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--client-in-process", action="store_true",
                    help="run the WebSocket clients in the server's process (default: a separate "
                         "`turboserve loadgen` process, as a real client would be)")
    args = ap.parse_args(argv)

    from turboserve.config import TurboConfig
    from turboserve.profile import ProfileLatencyModel, load_latency_model, save_profile
    from turboserve.profile.calibrate import busy_at_start, calibrate, timed_round
    from turboserve.serving.app import create_app
    from turboserve.serving.cli import demo_trace
    from turboserve.serving.embedded import build_runtime
    from turboserve.serving.loadgen import replay
    from turboserve.serving.server import ServerThread
    from turboserve.sim.driver import simulate
    from turboserve.traces.schema import read_trace

    tmp = Path(tempfile.mkdtemp(prefix="turboserve-fidelity-"))
    profile = args.profile
    if profile is None:
        profile = str(tmp / "tiny-profile.json")
        print(f"profiling tiny on this machine -> {profile}", file=sys.stderr)
        # Profile under the conditions the live engines run in: each of the N CPU engines
        # gets cores / N threads (serving/embedded.py does the same).
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, "-m", "turboserve.cli", "profile", "--model", "tiny", "--device", "cpu",
                        "--out", profile], check=True, env=env)
    model = load_latency_model([profile])
    one = read_trace(args.trace) if args.trace else demo_trace(args.sessions, seed=args.seed)
    records = repeated(one, args.repeat)
    calibration = repeated(demo_trace(len(one), seed=args.seed + 1), args.repeat)
    cfg = TurboConfig().with_overrides([f"serve.storage_dir='{tmp / 'recordings'}'",
                                        f"cluster.gpus={args.workers}", f"cluster.min_gpus={args.workers}"])

    runtime = build_runtime(cfg, model="tiny", policy=args.policy, workers=args.workers, latency_model=model)
    server_side: list[float] = []
    lock = threading.Lock()

    def on_chunk(d):
        with lock:
            server_side.append(d.latency_ms)
    runtime.add_listener(on_chunk, lambda *a: None)
    rounds = []  # (batch, mean context, steps, measured ms) of every round the engines ran
    timings = []  # (worker, start s, end s) of the same rounds

    def on_round(wid, o):
        if o.chunk_indices:
            end = time.monotonic()
            with lock:
                rounds.append(timed_round(model, o))
                timings.append((wid, end - o.duration_ms / 1000.0, end))
    runtime.add_round_listener(on_round)
    with ServerThread(create_app(runtime, cfg)) as srv:
        print(f"calibration replay: {len(calibration)} sessions (seed {args.seed + 1})", file=sys.stderr)
        replay_live(calibration, srv.base_url, tmp, args.client_in_process)
        with lock:
            cal_rounds, shared = list(rounds), busy_at_start(timings)
            rounds.clear()
            timings.clear()
        calibrated = calibrate(model.profile("tiny"), cal_rounds, shared=shared,
                               note=f"bench/fidelity.py, {args.workers} engines")
        by_batch = ratios_by_batch(model.profile("tiny"), cal_rounds)
        # the same rounds with one distribution whatever the other engine does (side by side)
        iid = calibrate(model.profile("tiny"), cal_rounds, note="no contention")
        with lock:
            server_side.clear()
        print(f"replay: {len(records)} sessions (seed {args.seed})", file=sys.stderr)
        live = replay_live(records, srv.base_url, tmp, args.client_in_process)
        with lock:  # the first replay's rounds and server-side latencies are the ones compared
            own_rounds, own_timings, own_server = list(rounds), list(timings), list(server_side)
        again = []
        for k in range(1, max(1, args.live_repeats)):
            print(f"replay again ({k + 1} of {args.live_repeats})", file=sys.stderr)
            again.append(replay_live(records, srv.base_url, tmp, args.client_in_process))
    sim = simulate(records, args.policy, model, cfg, shape="tiny").summary
    sim_cal = seeds_mean(records, args.policy, ProfileLatencyModel([calibrated]), cfg, args.sim_seeds)
    sim_iid = seeds_mean(records, args.policy, ProfileLatencyModel([iid]), cfg, args.sim_seeds)
    # The same calibration on this replay's own rounds: how well the simulator's batching,
    # queueing and scheduling turn the rounds the engines really ran into chunk latencies,
    # apart from how much this machine's speed moved between the two replays.
    self_cal = calibrate(model.profile("tiny"), own_rounds, shared=busy_at_start(own_timings), note="this replay")
    sim_self = seeds_mean(records, args.policy, ProfileLatencyModel([self_cal]), cfg, args.sim_seeds)
    self_iid = calibrate(model.profile("tiny"), own_rounds, note="this replay, no contention")
    sim_self_iid = seeds_mean(records, args.policy, ProfileLatencyModel([self_iid]), cfg, args.sim_seeds)

    slo = sim["slo_ms"]
    srv_lat = np.asarray(own_server)
    rows = {
        "simulate": sim,
        "sim calibrated": sim_cal,
        "sim cal. i.i.d.": sim_iid,
        "sim cal. here": sim_self,
        "sim here i.i.d.": sim_self_iid,
        "live (client)": live,
        "live (server)": {
            "p50_chunk_latency_ms": float(np.percentile(srv_lat, 50)) if srv_lat.size else float("nan"),
            "p99_chunk_latency_ms": float(np.percentile(srv_lat, 99)) if srv_lat.size else float("nan"),
            "mean_chunk_latency_ms": float(srv_lat.mean()) if srv_lat.size else float("nan"),
            "slo_attainment": float((srv_lat <= slo).mean()) if srv_lat.size else float("nan"),
            "chunks": int(srv_lat.size),
        },
    }
    for k, m in enumerate(again):
        rows["live again" + (f" {k + 1}" if len(again) > 1 else "")] = m
    keys = ("p50_chunk_latency_ms", "p99_chunk_latency_ms", "mean_chunk_latency_ms", "slo_attainment", "chunks")
    print(f"calibrated profile: {calibrated.source}")
    live_batches = ratios_by_batch(model.profile("tiny"), own_rounds)
    for name, table in (("calibration replay", by_batch), ("replay", live_batches)):
        print(f"{name}: measured/profiled round time by batch: " + ", ".join(
            f"{b}: n={n} p50 {p50:.2f} p90 {p90:.2f}" for b, (n, p50, p90) in sorted(table.items())))
    print(f"{'run':<15}" + "".join(f"{k.replace('_chunk_latency_ms', ' ms'):>16}" for k in keys)
          + "   p50 vs live   p99 vs live")
    out = {"profile": profile, "sessions": len(records), "workers": args.workers,
           "calibration": calibrated.source, "ratios_by_batch": {"calibration": by_batch, "replay": live_batches},
           "runs": {}}
    for name, m in rows.items():
        vals = [m.get(k, float("nan")) for k in keys]
        err50 = m["p50_chunk_latency_ms"] / live["p50_chunk_latency_ms"] - 1.0
        err99 = m["p99_chunk_latency_ms"] / live["p99_chunk_latency_ms"] - 1.0
        print(f"{name:<15}" + "".join(f"{v:>16.3f}" if isinstance(v, float) else f"{v:>16}" for v in vals)
              + f"{100 * err50:>13.1f}%{100 * err99:>13.1f}%")
        out["runs"][name] = {**{k: m.get(k) for k in keys}, "p50_rel_err": err50, "p99_rel_err": err99}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
        save_profile(calibrated, Path(args.json_out).with_suffix(".profile.json"))
    return 0


def seeds_mean(records, policy, model, cfg, seeds: int) -> dict:
    """The simulation's summary with each latency figure and the SLO attainment averaged
    over `seeds` seeds of the round-time draws (one run's p99 is a handful of chunks)."""
    from turboserve.sim.driver import simulate

    runs = [simulate(records, policy, model, cfg.with_overrides([f"sim.seed={k}"]), shape="tiny").summary
            for k in range(max(1, seeds))]
    out = dict(runs[0])
    for k in ("p50_chunk_latency_ms", "p99_chunk_latency_ms", "mean_chunk_latency_ms", "slo_attainment"):
        out[k] = float(np.mean([r[k] for r in runs]))
    return out


def ratios_by_batch(profile, rounds) -> dict[int, tuple[int, float, float]]:
    """batch -> (rounds, p50, p90 of measured over profiled time)."""
    from turboserve.profile.calibrate import round_ratios

    by: dict[int, list[float]] = {}
    for b, r in round_ratios(profile, rounds):
        by.setdefault(b, []).append(r)
    out = {}
    for b, rs in sorted(by.items()):
        rs.sort()
        out[b] = (len(rs), rs[len(rs) // 2], rs[int(0.9 * (len(rs) - 1))])
    return out


def repeated(records, n: int, gap_s: float = 2.0):
    """`records` n times back to back (each copy after the previous one's nominal end plus
    `gap_s`), with ids made unique: the same load pattern, n times the chunks."""
    from dataclasses import replace

    from turboserve.sim.driver import nominal_end_s

    if n < 1:
        raise SystemExit(f"--repeat must be >= 1, got {n}")
    span = nominal_end_s(records) - min(r.arrival_s for r in records) + gap_s
    return [replace(r, id=f"{r.id}.{i}", arrival_s=r.arrival_s + i * span) for i in range(n) for r in records]


def replay_live(records, url: str, tmp: Path, in_process: bool) -> dict:
    """The trace replayed against the live server; returns its run's metrics as the clients
    measured them."""
    if in_process:
        return asyncio.run(replay(records, url, timeout_s=900.0)).report["runs"][0]["metrics"]
    return loadgen_process(records, url, tmp)


def loadgen_process(records, url: str, tmp: Path) -> dict:
    """The trace replayed by `turboserve loadgen` in its own process (its clients then take
    no interpreter time from the server's engines); returns its run's metrics."""
    from turboserve.traces.schema import write_trace

    trace, out = tmp / "trace.jsonl", tmp / "loadgen.json"
    write_trace(records, trace)
    subprocess.run([sys.executable, "-m", "turboserve.cli", "loadgen", "--trace", str(trace), "--url", url,
                    "--json", str(out), "--timeout-s", "900"], check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["runs"][0]["metrics"]


if __name__ == "__main__":
    sys.exit(main())
