"""The live runtime the serving layer talks to: sessions in, chunks and cluster state out.

In: API calls (create a session, change its prompt, pause, resume, close) and the events
and chunk deliveries coming back from workers through a transport.
Out: `ChunkDelivery`s to listeners (the stream hub), `SessionInfo` and `ClusterInfo`
snapshots for the API and metrics.

`ServingRuntime` is the small interface the HTTP layer depends on; `ClusterRuntime` (below)
implements it with the real `Controller` running the registered policy over a transport
(`LocalTransport` in-process, or `RayTransport`). Errors a client can fix are typed here so
the API maps them to status codes without knowing the runtime. `serving/embedded.py`
assembles a `ClusterRuntime` from a model name, a policy name and a backend.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..config import TurboConfig
from ..events import (Event, MigrationFinished, OffloadFinished, RestoreFinished, SessionActivated,
                      SessionArrived, SessionDeparted, SessionFailed, SessionPaused, Tick, WorkerLost,
                      WorkerReady)
from ..types import SessionId, SessionSpec, SessionState, WorkerId, WorkerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkDelivery:
    """One chunk handed to the user's stream."""

    session_id: SessionId
    chunk_index: int
    frames: Any  # numpy uint8 (T, H, W, 3)
    latency_ms: float  # due -> delivered, measured on the runtime's clock
    worker: WorkerId
    time_s: float  # delivery time on the runtime's clock (monotonic seconds since start)


@dataclass(frozen=True)
class SessionInfo:
    id: SessionId
    state: SessionState
    spec: SessionSpec
    prompt: str
    chunks_generated: int
    worker: WorkerId | None
    created_s: float  # runtime clock
    max_chunks: int  # 0 = until closed
    chunks_wanted: int = 0  # chunks left in the current active period; 0 = until paused
    error: str = ""  # why it failed, when state is FAILED

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "state": self.state.value,
            "spec": self.spec.to_dict(),
            "prompt": self.prompt,
            "chunks_generated": self.chunks_generated,
            "worker": self.worker,
            "created_s": round(self.created_s, 3),
            "max_chunks": self.max_chunks,
            "error": self.error,
        }


@dataclass(frozen=True)
class WorkerInfo:
    id: WorkerId
    device: str
    state: str  # WorkerState value
    load_ms: float  # predicted cycle time
    batch: int  # active sessions (the size of its coalesced rounds, summed over groups)
    sessions: tuple[SessionId, ...]
    last_round_ms: float = 0.0  # measured duration of its latest round


@dataclass(frozen=True)
class MigrationInfo:
    session_id: SessionId
    src: WorkerId
    dst: WorkerId
    ok: bool
    time_s: float
    bytes_moved: int = 0
    downtime_ms: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class ClusterInfo:
    now_s: float
    policy: str
    workers: tuple[WorkerInfo, ...]
    migrations: tuple[MigrationInfo, ...]  # recent, newest last
    counters: dict = field(default_factory=dict)  # migrations, offloads, resumes, ...
    sessions_by_state: dict = field(default_factory=dict)  # SessionState value -> count
    gpus_provisioned: int = 0
    gpus_ready: int = 0
    cost_usd: float = 0.0  # accumulated since start at the configured prices
    slo_ms: float = 0.0  # per-chunk target of the default spec

    def to_dict(self) -> dict:
        return {
            "now_s": round(self.now_s, 3),
            "policy": self.policy,
            "workers": [
                {"id": w.id, "device": w.device, "state": w.state, "load_ms": round(w.load_ms, 3),
                 "batch": w.batch, "sessions": list(w.sessions),
                 "last_round_ms": round(w.last_round_ms, 3)}
                for w in self.workers
            ],
            "migrations": [
                {"session_id": m.session_id, "src": m.src, "dst": m.dst, "ok": m.ok,
                 "time_s": round(m.time_s, 3), "bytes": m.bytes_moved,
                 "downtime_ms": round(m.downtime_ms, 3), "reason": m.reason}
                for m in self.migrations
            ],
            "counters": dict(self.counters),
            "sessions_by_state": dict(self.sessions_by_state),
            "gpus_provisioned": self.gpus_provisioned,
            "gpus_ready": self.gpus_ready,
            "cost_usd": round(self.cost_usd, 6),
            "slo_ms": self.slo_ms,
        }


class SpecError(ValueError):
    """A session field the model cannot serve; `field` names it for the API's 4xx body."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class UnknownSession(KeyError):
    pass


class SessionConflict(RuntimeError):
    """The request does not fit the session's state (e.g. resuming a closed session)."""


class CapacityError(RuntimeError):
    """The server cannot take another session now (max sessions, no memory anywhere)."""


ChunkListener = Callable[[ChunkDelivery], None]
EndListener = Callable[[SessionId, str, str], None]  # (session, final state, reason)


class ServingRuntime(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def ready(self) -> bool:
        """At least one worker accepts sessions."""
        ...

    def resolve_spec(self, requested: dict) -> SessionSpec:
        """Fill model defaults into the requested fields (`SessionSpec` names, absent = default)
        and check them; raises `SpecError` naming the field and its allowed values."""
        ...

    def create_session(self, session_id: SessionId, spec: SessionSpec, prompt: str, *,
                       max_chunks: int = 0, chunks: int = 0) -> SessionInfo:
        """Admit a session. It is committed (visible, billed to the cluster) only once
        admitted; `CapacityError` leaves no trace. `chunks`: chunks wanted in the first active
        period, after which it idles by itself (0 = until paused); `max_chunks`: the session
        closes after this many in total (0 = until closed)."""
        ...

    def set_prompt(self, session_id: SessionId, prompt: str) -> SessionInfo: ...

    def pause(self, session_id: SessionId) -> SessionInfo: ...

    def resume(self, session_id: SessionId, *, chunks: int = 0) -> SessionInfo: ...

    def close(self, session_id: SessionId) -> SessionInfo: ...

    def session(self, session_id: SessionId) -> SessionInfo: ...

    def cluster(self) -> ClusterInfo: ...

    def add_listener(self, on_chunk: ChunkListener, on_end: EndListener) -> None:
        """Listeners run on worker threads: they must be quick and never raise."""
        ...


# ---------------------------------------------------------------------------------------
# The live implementation: the real Controller and policy over a transport.
# ---------------------------------------------------------------------------------------

_LIVE_WORKER_STATES = (WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING)


@dataclass
class _Record:
    """The runtime's own record of a session: outlives its controller entry (closed/failed)."""

    spec: SessionSpec
    prompt: str
    created_s: float
    max_chunks: int
    chunks: int = 0  # delivered
    final: SessionState | None = None  # CLOSED or FAILED once ended
    error: str = ""
    last_worker: WorkerId | None = None


class ClusterRuntime:
    """`ServingRuntime` over the real `Controller`.

    Every event (API calls, worker completions, ticks) goes through one queue and is applied
    by one controller thread, so the controller and policy see a serial event stream exactly
    as in the simulator. API calls wait until their event has been applied, so a `GET`
    after a `pause` already sees the pause. Chunk frames do not pass through the queue: the
    transport's round hook hands them to listeners on the engine thread.
    """

    def __init__(self, *, controller, transport, config: TurboConfig, policy_name: str,
                 resolve_spec: Callable[[dict], SessionSpec], max_migrations_kept: int = 50):
        self.controller = controller
        self.transport = transport
        self.config = config
        self.policy_name = policy_name
        self._resolve_spec = resolve_spec
        self._t0 = time.monotonic()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.RLock()  # held while the controller applies an event
        self._records: dict[SessionId, _Record] = {}
        self._live = 0  # sessions admitted and not ended
        self._chunk_listeners: list[ChunkListener] = []
        self._round_listeners: list[Callable[[WorkerId, Any], None]] = []
        self._end_listeners: list[EndListener] = []
        self._migrations: deque[MigrationInfo] = deque(maxlen=max_migrations_kept)
        self._counters = {"migrations": 0, "migrations_aborted": 0, "migration_bytes": 0,
                          "offloads": 0, "resumes": 0, "scale_outs": 0, "releases": 0,
                          "workers_lost": 0, "sessions_failed": 0}
        self._gpu_seconds = 0.0  # provisioned workers integrated over time
        self._gpu_last = (0.0, 0)  # (time_s, provisioned) of the last sample
        self._thread: threading.Thread | None = None
        self._running = False
        self._ended_records: deque[SessionId] = deque()  # oldest ended first, for trimming
        transport.bind(self._post)
        if hasattr(transport, "set_round_hook"):
            transport.set_round_hook(self._on_round)

    # ------------------------------------------------------------------ clock, lifecycle
    def now(self) -> float:
        return time.monotonic() - self._t0

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        with self._lock:
            self.controller.bootstrap(self.now())
            self._sample_gpus(self.now())
        self._thread = threading.Thread(target=self._loop, name="controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self._events.put(None)
        if self._thread is not None:
            self._thread.join(10.0)
        shutdown = getattr(self.transport, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def ready(self) -> bool:
        with self._lock:
            st = self.controller.state
            return self._running and any(st.worker(w).state is WorkerState.READY for w in st.worker_ids())

    def add_listener(self, on_chunk: ChunkListener, on_end: EndListener) -> None:
        self._chunk_listeners.append(on_chunk)
        self._end_listeners.append(on_end)

    def add_round_listener(self, on_round: Callable[[WorkerId, Any], None]) -> None:
        """Every finished round (`engine.core.RoundOutcome`: batch, measured duration),
        on the worker's thread; for benchmarks that calibrate or trace the engines."""
        self._round_listeners.append(on_round)

    # ------------------------------------------------------------------ event loop
    def _post(self, event: Event) -> None:
        """Transport completions (any thread)."""
        self._events.put((event, None))

    def _call(self, event: Event, timeout_s: float = 30.0) -> None:
        """Apply an API event and wait until the controller has taken it."""
        if not self._running:
            raise CapacityError("the server is not running")
        done = threading.Event()
        self._events.put((event, done))
        if not done.wait(timeout_s):
            raise CapacityError(f"the controller did not take the request within {timeout_s:.0f} s")

    def _loop(self) -> None:
        tick_s = max(0.05, self.config.sim.tick_s)
        next_tick = self.now() + tick_s
        while True:
            try:
                item = self._events.get(timeout=max(0.0, next_tick - self.now()))
            except queue.Empty:
                item = (Tick(self.now()), None)
                next_tick = self.now() + tick_s
            if item is None:
                return
            event, done = item
            try:
                self._apply(event)
            except Exception:  # noqa: BLE001 - one bad event must not stop the control loop
                log.exception("controller failed on %r", event)
            finally:
                if done is not None:
                    done.set()
            if self.now() >= next_tick:
                self._events.put((Tick(self.now()), None))
                next_tick = self.now() + tick_s

    def _apply(self, event: Event) -> None:
        with self._lock:
            if (isinstance(event, (SessionDeparted, SessionFailed))
                    and not self.controller.state.has_session(event.session_id)):
                return  # already gone (closed twice, failed then closed)
            self.controller.on_event(event)
            if isinstance(event, SessionArrived) and event.session_id in self.controller.failed:
                # refused on admission (e.g. a shape the latency model does not know)
                self._end(event.session_id, SessionState.FAILED, self.controller.failed[event.session_id],
                          tell_controller=False)
            self._observe(event)
            self._sample_gpus(event.time_s)

    def _observe(self, event: Event) -> None:
        c = self._counters
        if isinstance(event, MigrationFinished):
            self._migrations.append(MigrationInfo(event.session_id, event.src, event.dst, event.ok,
                                                  event.time_s, event.bytes_moved, event.downtime_ms,
                                                  event.reason))
            if event.ok:
                c["migrations"] += 1
                c["migration_bytes"] += event.bytes_moved
            else:
                c["migrations_aborted"] += 1
        elif isinstance(event, OffloadFinished):
            c["offloads"] += 1
        elif isinstance(event, RestoreFinished):
            c["resumes"] += 1
        elif isinstance(event, WorkerReady):
            c["scale_outs"] += 1
        elif isinstance(event, WorkerLost):
            c["workers_lost"] += 1
        elif isinstance(event, SessionFailed):
            # reported by a worker (a placement or restore that could not be done)
            self._end(event.session_id, SessionState.FAILED, event.reason or "failed on its worker",
                      tell_controller=False)
        elif isinstance(event, SessionPaused):
            rec = self._records.get(event.session_id)
            if rec is not None and rec.max_chunks and rec.chunks >= rec.max_chunks and rec.final is None:
                self._end(event.session_id, SessionState.CLOSED, "max_chunks reached")

    def _sample_gpus(self, now_s: float) -> None:
        st = self.controller.state
        provisioned = sum(1 for w in st.worker_ids() if st.worker(w).state in _LIVE_WORKER_STATES)
        t, n = self._gpu_last
        if now_s > t:
            self._gpu_seconds += n * (now_s - t)
        self._gpu_last = (max(now_s, t), provisioned)

    # ------------------------------------------------------------------ rounds (engine threads)
    def _on_round(self, worker_id: WorkerId, outcome) -> None:
        for listener in self._round_listeners:
            try:
                listener(worker_id, outcome)
            except Exception:  # noqa: BLE001 - listeners must not break the engine
                log.exception("round listener failed")
        frames = outcome.frames or (None,) * len(outcome.session_ids)
        fin = outcome.finished_s
        for sid, idx, due, fr in zip(outcome.session_ids, outcome.chunk_indices, outcome.due_s, frames):
            rec = self._records.get(sid)
            if rec is None or rec.final is not None:
                continue
            rec.chunks = max(rec.chunks, idx + 1)
            rec.last_worker = worker_id
            d = ChunkDelivery(sid, idx, fr, (fin - due) * 1000.0, worker_id, fin)
            for listener in self._chunk_listeners:
                try:
                    listener(d)
                except Exception:  # noqa: BLE001 - listeners must not break the engine
                    log.exception("chunk listener failed")
        for sid, why in outcome.failed.items():
            rec = self._records.get(sid)
            if rec is not None and rec.final is None:
                log.warning("session %s failed on %s: %s", sid, worker_id, why)
                self._counters["sessions_failed"] += 1
                self._end(sid, SessionState.FAILED, why)

    def _end(self, sid: SessionId, final: SessionState, reason: str, *,
             tell_controller: bool = True) -> None:
        """Mark a session ended, tell the controller and the listeners (any thread)."""
        rec = self._records.get(sid)
        if rec is None or rec.final is not None:
            return
        rec.final = final
        rec.error = reason if final is SessionState.FAILED else ""
        with self._lock:
            self._live -= 1
            self._ended_records.append(sid)
            while len(self._ended_records) > 10_000:  # keep the last ended sessions inspectable
                self._records.pop(self._ended_records.popleft(), None)
        if tell_controller:
            ended = (SessionFailed(self.now(), sid, reason) if final is SessionState.FAILED
                     else SessionDeparted(self.now(), sid))
            self._events.put((ended, None))
        for listener in self._end_listeners:
            try:
                listener(sid, final.value, reason)
            except Exception:  # noqa: BLE001
                log.exception("end listener failed")

    # ------------------------------------------------------------------ API
    def resolve_spec(self, requested: dict) -> SessionSpec:
        return self._resolve_spec(requested)

    def create_session(self, session_id: SessionId, spec: SessionSpec, prompt: str, *,
                       max_chunks: int = 0, chunks: int = 0) -> SessionInfo:
        with self._lock:
            if session_id in self._records:
                raise SessionConflict(f"session {session_id!r} exists")
            if self._live >= self.config.serve.max_sessions:
                raise CapacityError(f"the server holds its maximum of {self.config.serve.max_sessions} "
                                    "sessions (serve.max_sessions); retry later")
            if not self.ready():
                raise CapacityError("no worker is ready yet; retry shortly (see /readyz)")
            # Staged: counted now so concurrent creations cannot overshoot; the record
            # becomes visible only once the controller has admitted it.
            self._live += 1
        rec = _Record(spec, prompt, self.now(), max_chunks)
        wanted = _period_chunks(chunks, max_chunks, 0)
        try:
            self._records[session_id] = rec
            self._call(SessionArrived(self.now(), session_id, spec, prompt, chunks_wanted=wanted))
        except Exception:
            self._records.pop(session_id, None)
            with self._lock:
                self._live -= 1
            raise
        return self.session(session_id)

    def set_prompt(self, session_id: SessionId, prompt: str) -> SessionInfo:
        rec = self._live_record(session_id)
        rec.prompt = prompt
        setter = getattr(self.transport, "set_prompt", None)
        if setter is not None:
            setter(session_id, prompt)
        return self.session(session_id)

    def pause(self, session_id: SessionId) -> SessionInfo:
        self._live_record(session_id)
        self._call(SessionPaused(self.now(), session_id))
        return self.session(session_id)

    def resume(self, session_id: SessionId, *, chunks: int = 0) -> SessionInfo:
        rec = self._live_record(session_id)
        if rec.max_chunks and rec.chunks >= rec.max_chunks:
            raise SessionConflict(f"session {session_id!r} already produced its max_chunks={rec.max_chunks}")
        wanted = _period_chunks(chunks, rec.max_chunks, rec.chunks)
        self._call(SessionActivated(self.now(), session_id, chunks_wanted=wanted))
        return self.session(session_id)

    def close(self, session_id: SessionId) -> SessionInfo:
        rec = self._records.get(session_id)
        if rec is None:
            raise UnknownSession(session_id)
        if rec.final is None:
            self._end(session_id, SessionState.CLOSED, "closed by the client")
            self._wait_applied()
        return self.session(session_id)

    def _wait_applied(self) -> None:
        done = threading.Event()
        self._events.put((Tick(self.now()), done))
        done.wait(30.0)

    def _live_record(self, session_id: SessionId) -> _Record:
        rec = self._records.get(session_id)
        if rec is None:
            raise UnknownSession(session_id)
        if rec.final is not None:
            raise SessionConflict(f"session {session_id!r} is {rec.final.value}")
        return rec

    def session(self, session_id: SessionId) -> SessionInfo:
        rec = self._records.get(session_id)
        if rec is None:
            raise UnknownSession(session_id)
        worker = rec.last_worker
        wanted = 0
        if rec.final is not None:
            state = rec.final
            worker = None
        else:
            with self._lock:
                st = self.controller.state
                if st.has_session(session_id):
                    view = st.session(session_id)
                    state, worker = view.state, view.worker
                    wanted = st.chunks_wanted(session_id)
                else:
                    state = SessionState.QUEUED
        return SessionInfo(session_id, state, rec.spec, rec.prompt, rec.chunks, worker, rec.created_s,
                           rec.max_chunks, wanted, rec.error)

    def cluster(self) -> ClusterInfo:
        stats = getattr(self.transport, "worker_stats", lambda: {})()
        with self._lock:
            now = self.now()
            st = self.controller.state
            workers = []
            provisioned = ready = 0
            for wid in st.worker_ids():
                w = st.worker(wid)
                if w.state in _LIVE_WORKER_STATES:
                    provisioned += 1
                if w.state is WorkerState.READY:
                    ready += 1
                s = stats.get(wid, {})
                workers.append(WorkerInfo(wid, s.get("device", "?"), w.state.value, w.load_ms,
                                          sum(g.batch for g in w.groups), tuple(sorted(w.sessions)),
                                          s.get("last_round_ms", 0.0)))
            by_state: dict[str, int] = {}
            for sid in st.session_ids():
                key = st.session(sid).state.value
                by_state[key] = by_state.get(key, 0) + 1
            t, n = self._gpu_last
            gpu_s = self._gpu_seconds + n * max(0.0, now - t)
            counters = dict(self._counters)
            ctl_counters = getattr(self.controller, "counters", None)
            counters["releases"] = int(getattr(ctl_counters, "workers_released", 0))
            counters["prefetches"] = int(getattr(ctl_counters, "prefetches", 0))
            samples = list(getattr(self.controller, "decision_ms", ()) or ())
            migrations = tuple(self._migrations)
        by_state["closed"] = sum(1 for r in self._records.values() if r.final is SessionState.CLOSED)
        by_state["failed"] = sum(1 for r in self._records.values() if r.final is SessionState.FAILED)
        if samples:
            ordered = sorted(samples[-10_000:])
            counters["decision_ms_p50"] = ordered[len(ordered) // 2]
            counters["decision_ms_p99"] = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        cl = self.config.cluster
        f = min(max(cl.spot_fraction, 0.0), 1.0)
        price = (1 - f) * cl.price_per_gpu_hour_usd + f * cl.spot_price_per_gpu_hour_usd
        default = None
        try:
            default = self._resolve_spec({})
        except Exception:  # noqa: BLE001
            pass
        slo_ms = self.config.slo.slo_ms or (1000.0 * default.chunk_seconds if default else 0.0)
        return ClusterInfo(now, self.policy_name, tuple(workers), migrations, counters, by_state,
                           provisioned, ready, gpu_s / 3600.0 * price, slo_ms)


def _period_chunks(requested: int, max_chunks: int, done: int) -> int:
    """Chunks wanted for the next active period: the request, bounded by what max_chunks
    leaves (0 = unbounded)."""
    if not max_chunks:
        return requested
    left = max(1, max_chunks - done)
    return min(requested, left) if requested else left
