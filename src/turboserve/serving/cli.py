"""`turboserve serve` and `turboserve demo`.

In: parsed arguments (the argparse lives in `turboserve/cli.py`) and the config.
Out: `serve` runs the HTTP/WebSocket server in the foreground until interrupted; `demo`
starts the embedded server on a free loopback port, replays a short bursty trace through it
with real WebSocket clients (progress bar), prints the same report as `simulate`, and
leaves the trace, the report JSON and the sessions' MP4 recordings under `--out`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np

from ..config import TurboConfig, load_config
from ..types import Period, SessionRecord, SessionSpec


def _config(args) -> TurboConfig:
    return load_config(getattr(args, "config", None), getattr(args, "overrides", None))


def _profiles(args) -> list[str]:
    p = getattr(args, "profile", None)
    return [p] if p else []


def run_serve(args) -> int:
    import uvicorn

    from .app import create_app
    from .embedded import build_runtime

    config = _config(args)
    serve = dataclasses.replace(config.serve, host=args.host or config.serve.host,
                                port=args.port if args.port is not None else config.serve.port)
    config = dataclasses.replace(config, serve=serve)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..profile import load_latency_model

    model = load_latency_model(_profiles(args))
    runtime = build_runtime(config, model=args.model, weights=args.weights, policy=args.policy,
                            backend=args.backend, workers=args.workers, latency_model=model)
    recorder = None
    if getattr(args, "record_rounds", None):
        from ..profile.calibrate import RoundRecorder

        recorder = RoundRecorder(args.record_rounds, model)
        runtime.add_round_listener(recorder)
    app = create_app(runtime, config)
    print(f"turboserve: serving {args.model} with policy {args.policy} on "
          f"http://{serve.host}:{serve.port} (web page at /, API docs at /docs)", file=sys.stderr)
    try:
        uvicorn.run(app, host=serve.host, port=serve.port, log_level="info", ws="websockets-sansio")
    finally:
        if recorder is not None:
            recorder.close()
    return 0


def demo_trace(sessions: int, *, seed: int = 0, model: str = "tiny", fps: float = 16.0,
               frames_per_chunk: int = 4) -> list[SessionRecord]:
    """A short bursty trace: two bursts of arrivals 10 s apart, sessions of one to three
    active periods of 1-2.5 s of video with idle gaps of 1-3 s (sized for the `tiny` model
    on two CPU engines: bursts load both, the gaps let idle sessions go to host memory)."""
    if sessions < 1:
        raise ValueError(f"--sessions must be >= 1, got {sessions}")
    rng = np.random.default_rng(seed)
    spec = SessionSpec(model=model, fps=fps, frames_per_chunk=frames_per_chunk)
    prompts = ["a red fox running through fresh snow", "waves breaking on a black sand beach",
               "a paper boat drifting down a rainy street", "northern lights over a frozen lake",
               "a hummingbird hovering at a flower", "city traffic at night, long exposure"]
    records = []
    first_burst = (sessions + 1) // 2
    for i in range(sessions):
        burst_start = 0.0 if i < first_burst else 10.0
        arrival = burst_start + float(rng.uniform(0.0, 1.5))
        periods = []
        for p in range(int(rng.integers(1, 4))):
            periods.append(Period(active_s=float(rng.uniform(1.0, 2.5)), idle_s=float(rng.uniform(1.0, 3.0))))
        periods[-1] = Period(periods[-1].active_s, 0.0)
        records.append(SessionRecord(f"demo-{i}", arrival, spec.with_(seed=i), tuple(periods),
                                     prompt=prompts[i % len(prompts)]))
    return sorted(records, key=lambda r: r.arrival_s)


def run_demo(args) -> int:
    from tqdm import tqdm

    from ..sim.report import format_table, write_json
    from ..traces.schema import write_trace
    from .app import create_app
    from .embedded import build_runtime
    from .loadgen import chunks_for, replay
    from .server import ServerThread

    out = Path(args.out)
    recordings = out / "recordings"
    started = time.time()  # recordings of earlier demos may share the folder: list this run's
    config = _config(args)
    config = dataclasses.replace(
        config, serve=dataclasses.replace(config.serve, storage_dir=str(recordings)),
        # a short demo: idle sessions go to host memory quickly so offloads show
        offload=dataclasses.replace(config.offload, grace_s=min(config.offload.grace_s, 1.0)))
    logging.basicConfig(level=logging.WARNING)
    print("turboserve demo: starting the server (model tiny, policy turboserve)...", file=sys.stderr)
    runtime = build_runtime(config, model="tiny", policy="turboserve", extra_profiles=_profiles(args))
    with ServerThread(create_app(runtime, config), "127.0.0.1", 0) as server:
        default = runtime.resolve_spec({})
        records = demo_trace(args.sessions, model=default.model, fps=default.fps,
                             frames_per_chunk=default.frames_per_chunk)
        out.mkdir(parents=True, exist_ok=True)
        write_trace(records, out / "trace.jsonl")
        total = sum(chunks_for(p.active_s, default.chunk_seconds) for r in records for p in r.periods)
        print(f"turboserve demo: server at {server.base_url}; replaying {len(records)} sessions "
              f"({total} chunks) from {out / 'trace.jsonl'}", file=sys.stderr)
        with tqdm(total=total, desc="chunks", unit="chunk", file=sys.stderr) as bar:
            result = asyncio.run(replay(records, server.base_url, timeout_s=300.0,
                                        progress=lambda done, _t: bar.update(1)))
        cluster = runtime.cluster()
    print(format_table(result.report))
    write_json(result.report, out / "report.json")
    videos = sorted(v for v in recordings.glob("*.mp4") if v.stat().st_mtime >= started - 1.0)
    c = cluster.counters
    print(f"\nmigrations {c.get('migrations', 0)}, offloads {c.get('offloads', 0)}, "
          f"resumes {c.get('resumes', 0)}; {len(videos)} recordings of this run in {recordings}")
    for v in videos[:6]:
        print(f"  {v}")
    print(f"report: {out / 'report.json'}")
    errors = result.report.get("meta", {}).get("errors", [])
    if errors:
        print(f"{len(errors)} session(s) failed, first: {errors[0]}", file=sys.stderr)
        return 1
    return 0
