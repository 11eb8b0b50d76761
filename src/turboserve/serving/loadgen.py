"""`turboserve loadgen`: replay a session trace against a running server with real clients.

In: a session trace (JSONL, `traces.schema`), the server's base URL, a time scale.
Out: the same table and JSON report as `turboserve simulate` (`sim.report`), with per-chunk
latency measured on the client side, plus the server's GPU-hours, cost, migrations and
offloads read from `GET /v1/cluster`.

Each trace session becomes one client: at `arrival_s` it creates the session asking for its
first period's chunks (`chunks`), streams it over the WebSocket, and for every later
period resumes with that period's chunks `idle_s` after the viewer has watched the
previous one in real time (the simulator's driver does the same); after the last period
it closes the session. A chunk is *due* when the client asked for the period (create or
resume) or received the previous chunk of the period, so the client-side latency is the
simulator's per-chunk latency plus the network and encoding path. Arrival and idle times
are divided by `time_scale`; active periods are chunk counts, which no scale compresses.
The run is bounded: `max_sessions` clients and `timeout_s` seconds at most; chunks still
owed when it stops are counted with their wait so far, never silently dropped.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import httpx
import websockets

from ..types import SessionRecord


@dataclass
class ClientStats:
    """What one client saw."""

    session_id: str = ""
    latencies_ms: list[float] = field(default_factory=list)
    intervals_ms: list[float] = field(default_factory=list)  # between chunks of one period
    chunks_owed: int = 0
    unfinished_waits_ms: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class LoadgenResult:
    report: dict
    clients: list[ClientStats]
    wall_s: float


def chunks_for(active_s: float, chunk_seconds: float) -> int:
    return max(1, math.ceil(active_s / chunk_seconds - 1e-9))


async def _client(rec: SessionRecord, base: str, http: httpx.AsyncClient, t0: float, scale: float,
                  chunk_s: float, deadline: float, stats: ClientStats, on_chunk: Callable[[], None]) -> None:
    await asyncio.sleep(max(0.0, t0 + rec.arrival_s / scale - time.monotonic()))
    body: dict = {"prompt": rec.prompt or f"trace session {rec.id}", "seed": rec.spec.seed,
                  "steps": rec.spec.steps}
    # The server's model decides resolution, fps and chunk size; the trace's period lengths
    # are seconds of video, converted into that model's chunks.
    wanted = [chunks_for(p.active_s, chunk_s) for p in rec.periods]
    stats.chunks_owed = sum(wanted)
    due = time.monotonic()
    r = await http.post(f"{base}/v1/sessions", json={**body, "chunks": wanted[0]})
    if r.status_code != 201:
        stats.error = f"create: HTTP {r.status_code} {r.text[:200]}"
        stats.unfinished_waits_ms.append((time.monotonic() - due) * 1000.0)
        return
    created = r.json()
    sid, token = created["id"], created["token"]
    stats.session_id = sid
    auth = {"Authorization": f"Bearer {token}"}
    got = 0
    owed_now = True  # a chunk is due from `due` on
    try:
        url = created["stream_url"] + f"?format=fmp4&token={token}"
        async with websockets.connect(url, max_size=None, open_timeout=30) as ws:
            arrivals: asyncio.Queue[float] = asyncio.Queue()
            reader = asyncio.create_task(_read_chunks(ws, arrivals))
            try:
                watched_until = 0.0
                for i, n in enumerate(wanted):
                    if i > 0:
                        # The viewer watches the period in real time, then idles (as the
                        # simulator's driver does): the next period starts idle_s after that.
                        idle_s = rec.periods[i - 1].idle_s / scale
                        resume_at = max(time.monotonic(), watched_until) + idle_s
                        await asyncio.sleep(max(0.0, min(resume_at, deadline) - time.monotonic()))
                        if time.monotonic() >= deadline:
                            stats.error = "timed out"
                            owed_now = False  # the next period never started: nothing due
                            return
                        due = time.monotonic()
                        await _post(http, f"{base}/v1/sessions/{sid}/resume", auth, {"chunks": n})
                    period_start = due
                    for k in range(n):
                        left = deadline - time.monotonic()
                        try:
                            at = await asyncio.wait_for(arrivals.get(), timeout=max(0.01, left))
                        except asyncio.TimeoutError:
                            stats.error = stats.error or "timed out"
                            return
                        stats.latencies_ms.append(max(0.0, (at - due) * 1000.0))
                        if k > 0:
                            stats.intervals_ms.append((at - due) * 1000.0)
                        due = at
                        got += 1
                        on_chunk()
                    watched_until = max(time.monotonic(), period_start + n * chunk_s)
            finally:
                reader.cancel()
    except Exception as e:  # noqa: BLE001 - one client's failure is reported, the run goes on
        stats.error = f"{type(e).__name__}: {e}"
    finally:
        if owed_now and got < stats.chunks_owed:
            # The chunk due now counts with its wait so far: starving a session never looks
            # good. Chunks of periods that never started were never due and are not counted.
            stats.unfinished_waits_ms.append((time.monotonic() - due) * 1000.0)
        try:
            await http.delete(f"{base}/v1/sessions/{sid}", headers=auth)
        except Exception:  # noqa: BLE001
            pass


async def _post(http: httpx.AsyncClient, url: str, headers: dict, body: dict) -> dict:
    r = await http.post(url, json=body, headers=headers)
    if r.status_code >= 400:
        raise RuntimeError(f"POST {url}: HTTP {r.status_code} {r.text[:200]}")
    return r.json()


async def _read_chunks(ws, arrivals: asyncio.Queue) -> None:
    """Puts the arrival time of every chunk's media (the binary after its header)."""
    expecting_chunk = False
    async for msg in ws:
        if isinstance(msg, str):
            kind = json.loads(msg).get("type")
            expecting_chunk = kind == "chunk"
            if kind == "end":
                return
        elif expecting_chunk:
            arrivals.put_nowait(time.monotonic())
            expecting_chunk = False


async def _poll_cluster(http: httpx.AsyncClient, base: str, samples: list, stop: asyncio.Event,
                        period_s: float = 0.5) -> None:
    while not stop.is_set():
        try:
            c = (await http.get(f"{base}/v1/cluster")).json()
            samples.append((time.monotonic(), c))
        except Exception:  # noqa: BLE001 - a missed sample only coarsens the GPU series
            pass
        try:
            await asyncio.wait_for(stop.wait(), timeout=period_s)
        except asyncio.TimeoutError:
            pass


async def replay(records: list[SessionRecord], url: str, *, time_scale: float = 1.0,
                 timeout_s: float = 3600.0, progress: Callable[[int, int], None] | None = None,
                 max_connections: int = 512) -> LoadgenResult:
    """Replay `records` against the server at `url`; returns the report (as `simulate`)."""
    from ..sim.metrics import RunMetrics
    from ..sim.report import build_report, run_entry

    if time_scale <= 0:
        raise ValueError(f"--time-scale must be > 0, got {time_scale}")
    base = url.rstrip("/")
    if urlsplit(base).scheme not in ("http", "https"):
        raise ValueError(f"--url must start with http:// or https://, got {url!r}")
    limits = httpx.Limits(max_connections=max_connections)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as http:
        before = (await http.get(f"{base}/v1/cluster")).json()
        default = (await http.get(f"{base}/v1/models")).json()["models"][0]["default_spec"]
        chunk_s = default["frames_per_chunk"] / default["fps"]
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        stats = [ClientStats() for _ in records]
        done = [0]
        total = sum(1 for _ in records)

        def on_chunk():
            done[0] += 1
            if progress:
                progress(done[0], total)

        samples: list = []
        stop = asyncio.Event()
        poller = asyncio.create_task(_poll_cluster(http, base, samples, stop))
        await asyncio.gather(*(_client(rec, base, http, t0, time_scale, chunk_s, deadline, st, on_chunk)
                               for rec, st in zip(records, stats)))
        stop.set()
        await poller
        after = (await http.get(f"{base}/v1/cluster")).json()
    wall_s = time.monotonic() - t0
    slo_ms = float(after.get("slo_ms") or 0.0) or 250.0
    metrics = RunMetrics(slo_ms=slo_ms, playback_ms=slo_ms)
    for st in stats:
        for v in st.latencies_ms:
            metrics.record_chunks(v)
        for v in st.intervals_ms:
            metrics.record_intervals(v)
        for v in st.unfinished_waits_ms:
            metrics.record_unfinished(v)
    for t, c in samples:
        metrics.gpus_changed(t - t0, int(c.get("gpus_provisioned", 0)), int(c.get("gpus_ready", 0)))
    summary = metrics.summary(wall_s)
    cb, ca = before.get("counters", {}), after.get("counters", {})
    for key in ("migrations", "migrations_aborted", "offloads", "resumes"):
        summary[key] = int(ca.get(key, 0)) - int(cb.get(key, 0))
    summary["cost_usd"] = float(after.get("cost_usd", 0.0)) - float(before.get("cost_usd", 0.0))
    summary["decision_ms_p50"] = float(ca.get("decision_ms_p50", 0.0))
    summary["decision_ms_p99"] = float(ca.get("decision_ms_p99", 0.0))
    failed = [s for s in stats if s.error]
    summary["sessions"] = len(stats)
    summary["sessions_failed"] = len(failed)
    report = build_report(
        [run_entry(after.get("policy", "server"), summary, {"source": "loadgen"})],
        gpu_hours_lb=0.0, latency_lb_ms=0.0,
        meta={"url": base, "time_scale": time_scale, "wall_s": wall_s, "sessions": len(stats),
              "errors": [s.error for s in failed][:20]})
    # The oracle bounds need the latency model and the nominal trace: `simulate` reports
    # them; a client cannot, so they are absent (the table shows '-') rather than zero.
    report["oracle"] = {"gpu_hours_lb": None, "latency_lb_ms": None}
    return LoadgenResult(report, stats, wall_s)


def write_sessions(records: list[SessionRecord], clients: list[ClientStats], path: str) -> None:
    """One JSON line per replayed session: `trace_id`, `session_id` (the server's),
    `latencies_ms` (each chunk received, in order), `unfinished_waits_ms` (a chunk due and
    never received: its wait until the client gave up) and `error` (empty when none)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for rec, st in zip(records, clients):
            f.write(json.dumps({"trace_id": rec.id, "session_id": st.session_id,
                                "latencies_ms": [round(v, 3) for v in st.latencies_ms],
                                "unfinished_waits_ms": [round(v, 3) for v in st.unfinished_waits_ms],
                                "error": st.error}) + "\n")


def run(args) -> int:
    """`turboserve loadgen --trace F --url U [--json OUT] [--time-scale X]`."""
    from ..sim.report import format_table, write_json
    from ..traces.schema import read_trace

    records = read_trace(args.trace)
    limit = getattr(args, "max_sessions", None)
    if limit:
        records = records[:limit]
    if not records:
        raise ValueError(f"{args.trace}: no sessions to replay")
    bar = _progress_bar(sum(1 for _ in records))
    result = asyncio.run(replay(records, args.url, time_scale=args.time_scale,
                                timeout_s=getattr(args, "timeout_s", None) or 3600.0,
                                progress=bar.update if bar else None))
    if bar:
        bar.close()
    print(format_table(result.report))
    if args.json_out:
        write_json(result.report, args.json_out)
    if getattr(args, "sessions_out", None):
        write_sessions(records, result.clients, args.sessions_out)
    errors = result.report.get("meta", {}).get("errors", [])
    if errors:
        print(f"{len(errors)} session(s) failed, first: {errors[0]}", file=sys.stderr)
    return 0


class _progress_bar:
    """Chunks received so far (the total is unknown until the server says chunk sizes)."""

    def __init__(self, sessions: int):
        from tqdm import tqdm

        self._bar = tqdm(desc=f"loadgen ({sessions} sessions)", unit="chunk", file=sys.stderr,
                         disable=not sys.stderr.isatty())

    def update(self, done: int, _total: int) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
