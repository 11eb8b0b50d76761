"""The Controller: the closed loop. Events in, the policy's decisions out through a transport.

In: events (`turboserve.events`) from the simulator, the live transport or the HTTP API,
through `on_event`. Out: commands on a `Transport` (place, migrate, offload, activate,
pause, close, start/release workers), counters for the report, and the wall-clock time of
every policy call (`decision_ms`).

Per event: (1) update `ClusterState` (arrivals -> pending; RoundCompleted -> chunks and
context of those sessions; paused -> idle_resident; offload/restore/migration completions;
worker ready/lost; departures); (2) call `policy.decide(view, memory)`, timed with
`time.perf_counter`; (3) apply the Decision through the transport, validating each item: a
placement onto a non-ready or full worker, a migration of a session that is not where the
policy thinks, an offload of a session that is not idle are refused and logged, never
crash the loop.

RoundCompleted is by far the most frequent event, and most rounds change nothing a policy
cares about (a full-window session's context stops growing). So on RoundCompleted the
policy is called only when the round changed something while sessions are pending, or
the worker's predicted load moved by more than 1% since the last decision
(`LOAD_CHANGE_TO_DECIDE`) where it matters at once: a rise to the heaviest load, or a
fall to the lightest READY one, as of the last decision; other load changes wait for the
next tick. Every other event decides.

A lost worker's sessions go back to pending (the transport rebuilds them from their
checkpoints on placement); migrations into it are cancelled. Events emitted from inside a
command (immediate transports) are queued and handled after the current one, and calls
from several threads are serialised.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..config import TurboConfig
from ..events import (Event, MigrationFinished, OffloadFinished, RestoreFinished, RoundCompleted,
                      SessionActivated, SessionArrived, SessionDeparted, SessionFailed, SessionPaused,
                      Tick, WorkerLost, WorkerReady)
from ..policy.latency import LatencyModel
from ..policy.views import ClusterView, Decision, Policy, WorkerView
from ..types import SessionId, SessionState, WorkerId, WorkerState
from .state import ClusterState, StateError
from .transport import Transport

log = logging.getLogger("turboserve.controller")

LOAD_CHANGE_TO_DECIDE = 0.01  # relative change of a worker's load that warrants a decision


def load_extremes(workers: Iterable[WorkerView]) -> tuple[float, float]:
    """(lightest READY worker's load, heaviest READY or DRAINING worker's load) in ms;
    (inf, -inf) when there is none."""
    low, high = math.inf, -math.inf
    for w in workers:
        if w.state is WorkerState.READY:
            if w.load_ms < low:
                low = w.load_ms
        elif w.state is not WorkerState.DRAINING:
            continue
        if w.load_ms > high:
            high = w.load_ms
    return low, high


@dataclass
class ControllerCounters:
    """What the report needs from the control plane."""

    placements: int = 0
    resumes: int = 0  # placements of sessions that had state off-GPU (offloaded or rebuilt)
    migrations: int = 0  # committed
    migration_bytes: int = 0
    migration_downtime_ms: float = 0.0  # summed over committed migrations
    migration_downtime_max_ms: float = 0.0
    migrations_aborted: dict[str, int] = field(default_factory=dict)  # reason -> count
    offloads: int = 0  # finished
    offload_bytes: int = 0
    restores: int = 0
    restore_bytes: int = 0
    prefetches: int = 0  # idle sessions put back on a GPU from host memory before resuming
    refused: int = 0  # decision items refused by validation
    workers_started: int = 0
    workers_released: int = 0
    workers_lost: int = 0
    sessions_failed: int = 0
    sessions_lost: int = 0  # lost their GPU state with a worker (rebuilt later)
    events: int = 0
    decisions: int = 0
    policy_errors: int = 0  # policy calls that raised (only counted when not re-raised)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["migrations_aborted"] = dict(self.migrations_aborted)
        return d


class Controller:
    def __init__(self, policy: Policy, model: LatencyModel, config: TurboConfig, transport: Transport,
                 *, shape: str | None = None, worker_memory_bytes: int | None = None,
                 on_decision: Callable[[ClusterView, Decision], None] | None = None,
                 raise_policy_errors: bool = True) -> None:
        """`worker_memory_bytes`: GPU memory per worker for session state; default: the
        configured GPU memory less the weights of `shape` (when given and known to the
        model). `on_decision` is called after each policy call (tests, tracing). With
        `raise_policy_errors=False` (a live server) a policy that raises is logged and
        counted (`counters.policy_errors`) and the event goes on with no decision; by
        default it raises, so that simulations and tests never hide a broken policy."""
        self.policy = policy
        self.model = model
        self.config = config
        self.transport = transport
        self.state = ClusterState(model, config)
        self.memory = policy.initial_memory()
        self.worker_memory_bytes = (worker_memory_bytes if worker_memory_bytes is not None
                                    else _worker_memory(model, config, shape))
        self.on_decision = on_decision
        self.raise_policy_errors = raise_policy_errors
        self.decision_ms: list[float] = []  # wall time of each policy call
        self.counters = ControllerCounters()
        self.worker_samples: list[tuple[float, int, int]] = []  # (time_s, provisioned, ready)
        self.refusals: deque[str] = deque(maxlen=1000)  # most recent refused decision items
        self.failed: dict[SessionId, str] = {}  # sessions ended by an error -> why
        self.now_s = 0.0
        self._decided_load: dict[WorkerId, tuple[int, float]] = {}  # wid -> (decision no., load)
        # The workers' records as of the last decision (records are replaced, never changed,
        # so the list keeps that moment), and their (lightest READY, heaviest READY or
        # DRAINING) loads in ms, worked out when a round first needs them.
        self._decided_workers: list[WorkerView] = []
        self._extremes: tuple[float, float] | None = (math.inf, -math.inf)
        self._next_worker = 0
        self._ready = 0
        self._queue: deque[Event] = deque()
        self._busy = False
        self._lock = threading.Lock()
        self._handlers: dict[type, Callable[[Any], bool]] = {
            SessionArrived: self._on_arrived, SessionActivated: self._on_activated,
            SessionPaused: self._on_paused, SessionDeparted: self._on_departed,
            SessionFailed: self._on_failed, RoundCompleted: self._on_round,
            WorkerReady: self._on_worker_ready, WorkerLost: self._on_worker_lost,
            MigrationFinished: self._on_migration, OffloadFinished: self._on_offload,
            RestoreFinished: self._on_restore, Tick: self._on_tick,
        }
        transport.bind(self.on_event)

    # ------------------------------------------------------------------ driving
    def bootstrap(self, now_s: float) -> list[WorkerId]:
        """Provision `policy.initial_gpus(config)` workers, ready at once."""
        self.now_s = now_s
        n = max(0, int(self.policy.initial_gpus(self.config)))
        wids = [self._start_worker(now_s, ready=True) for _ in range(n)]
        self._sample_workers(now_s)
        return wids

    def on_event(self, event: Event) -> None:
        """Handle one event (and any it causes). Re-entrant and thread-safe: an event
        emitted while another is being handled is queued behind it."""
        with self._lock:
            self._queue.append(event)
            if self._busy:
                return
            self._busy = True
        while True:
            with self._lock:
                if not self._queue:
                    self._busy = False
                    return
                ev = self._queue.popleft()
            try:
                self._handle(ev)
            except Exception:
                with self._lock:
                    self._busy = False
                raise

    def view(self, now_s: float | None = None) -> ClusterView:
        return self.state.view(self.now_s if now_s is None else now_s)

    def decide_now(self, now_s: float) -> Decision:
        """Run the policy once outside any event (e.g. a periodic check) and apply it."""
        self.now_s = max(self.now_s, now_s)
        return self._decide(self.now_s)

    # ----------------------------------------------------------------- handlers
    def _handle(self, ev: Event) -> None:
        self.counters.events += 1
        if ev.time_s > self.now_s:
            self.now_s = ev.time_s
        handler = self._handlers.get(type(ev))
        if handler is None:
            raise TypeError(f"the controller does not handle {type(ev).__name__} events")
        if handler(ev):
            self._decide(self.now_s)

    def _on_arrived(self, ev: SessionArrived) -> bool:
        try:
            self.state.add_session(ev.session_id, ev.spec, ev.prompt, ev.time_s, ev.chunks_wanted)
        except StateError as e:
            self._fail(ev.session_id, str(e))
            return False
        return True

    def _on_activated(self, ev: SessionActivated) -> bool:
        st = self.state
        if not st.has_session(ev.session_id):
            return False
        what = st.activate(ev.session_id, ev.time_s, ev.chunks_wanted)
        if what == "engine":
            wid = st.session(ev.session_id).worker
            assert wid is not None
            self.transport.activate(ev.session_id, wid, ev.time_s, ev.chunks_wanted)
        return True

    def _on_paused(self, ev: SessionPaused) -> bool:
        st = self.state
        if not st.has_session(ev.session_id):
            return False
        if st.pause(ev.session_id, ev.time_s) == "engine":
            wid = st.session(ev.session_id).worker
            assert wid is not None
            self.transport.pause(ev.session_id, wid, ev.time_s)
            return True
        return False

    def _on_departed(self, ev: SessionDeparted) -> bool:
        if not self.state.has_session(ev.session_id):
            return False
        wid, dst = self.state.remove_session(ev.session_id)
        self.transport.close(ev.session_id, wid, ev.time_s)
        for w in (wid, dst):
            if w is not None:
                self._maybe_release(w, ev.time_s)
        return True

    def _on_failed(self, ev: SessionFailed) -> bool:
        if not self.state.has_session(ev.session_id):
            return False
        wid, dst = self.state.remove_session(ev.session_id)
        self._fail(ev.session_id, ev.reason or "failed on its worker")
        self.transport.close(ev.session_id, wid, ev.time_s)  # free whatever is left of it
        for w in (wid, dst):
            if w is not None:
                self._maybe_release(w, ev.time_s)
        return True

    def _on_round(self, ev: RoundCompleted) -> bool:
        st = self.state
        if not st.has_worker(ev.worker_id):
            return False
        wid = ev.worker_id
        before = st.worker(wid).load_ms
        changed = st.round_completed(wid, ev.session_ids, ev.time_s, ev.rounds)
        if changed and st.pending_count:
            # a context grew or a period ended: the room or loads the queue waits on moved
            # (a round that changed nothing changes no placement: a queued session waits
            # for memory or a READY worker, and those come with their own events)
            return True
        # The load this worker had at the last decision: recorded lazily, the first time the
        # worker reports a round after that decision (its load then is what the decision saw).
        epoch, base = self._decided_load.get(wid, (-1, 0.0))
        if epoch != self.counters.decisions:
            base = before
            self._decided_load[wid] = (self.counters.decisions, base)
        load = st.worker(wid).load_ms
        if abs(load - base) <= LOAD_CHANGE_TO_DECIDE * max(base, 1e-9):
            return False
        # Rebalancing moves sessions off the bottleneck onto the lightest workers, and the
        # autoscaler counts sessions, not contexts: only a rise at the top (a worse
        # bottleneck) or a fall at the bottom (a better destination) can call for a move
        # now. Anything else waits for the next tick (`sim.tick_s`), which also sees it.
        if self._extremes is None:
            self._extremes = load_extremes(self._decided_workers)
        low, high = self._extremes
        return load >= high if load > base else load <= low

    def _on_worker_ready(self, ev: WorkerReady) -> bool:
        st = self.state
        if not st.has_worker(ev.worker_id):
            return False
        if st.worker(ev.worker_id).state is not WorkerState.STARTING:
            return False  # already up (bootstrap workers are ready at once)
        st.set_worker_state(ev.worker_id, WorkerState.READY, ev.time_s)
        self._ready += 1
        self._sample_workers(ev.time_s)
        return True

    def _on_worker_lost(self, ev: WorkerLost) -> bool:
        st = self.state
        if not st.has_worker(ev.worker_id):
            return False
        was_up = st.worker(ev.worker_id).state in (WorkerState.READY, WorkerState.DRAINING)
        lost, cancelled = st.lose_worker(ev.worker_id, ev.time_s)
        self._decided_load.pop(ev.worker_id, None)
        self._ready -= 1 if was_up else 0
        self.counters.workers_lost += 1
        self.counters.sessions_lost += len(lost)
        for sid in cancelled:
            self.counters.migrations_aborted["dst_lost"] = self.counters.migrations_aborted.get("dst_lost", 0) + 1
        log.warning("worker %s lost: %d sessions to rebuild, %d migrations cancelled",
                    ev.worker_id, len(lost), len(cancelled))
        self._sample_workers(ev.time_s)
        return True

    def _on_migration(self, ev: MigrationFinished) -> bool:
        st = self.state
        if not st.has_session(ev.session_id) or st.session(ev.session_id).state is not SessionState.MIGRATING:
            return False  # cancelled already (a worker was lost, or the session ended)
        sv = st.session(ev.session_id)
        if sv.worker != ev.src:
            return False
        st.end_migration(ev.session_id, ev.ok, ev.time_s)
        c = self.counters
        if ev.ok:
            c.migrations += 1
            c.migration_bytes += ev.bytes_moved
            c.migration_downtime_ms += ev.downtime_ms
            c.migration_downtime_max_ms = max(c.migration_downtime_max_ms, ev.downtime_ms)
            self._maybe_release(ev.src, ev.time_s)
        else:
            c.migrations_aborted[ev.reason or "unknown"] = c.migrations_aborted.get(ev.reason or "unknown", 0) + 1
            self._maybe_release(ev.dst, ev.time_s)
        return True

    def _on_offload(self, ev: OffloadFinished) -> bool:
        if not self.state.end_offload(ev.session_id, ev.time_s):
            return False
        self.counters.offloads += 1
        self.counters.offload_bytes += ev.bytes_moved
        self._maybe_release(ev.worker_id, ev.time_s)
        # Only memory came free (an idle session holds no load): a decision can use it only
        # to place a queued session. An emptied worker is released above.
        return self.state.pending_count > 0

    def _on_restore(self, ev: RestoreFinished) -> bool:
        self.counters.restores += 1
        self.counters.restore_bytes += ev.bytes_moved
        return False  # nothing a policy needs: the placement already counted the session

    def _on_tick(self, ev: Tick) -> bool:
        return True

    # -------------------------------------------------------------- decisions
    def _decide(self, now_s: float) -> Decision:
        view = self.state.view(now_s)
        t0 = time.perf_counter()
        try:
            decision = self.policy.decide(view, self.memory)
        except Exception:
            if self.raise_policy_errors:
                raise
            self.counters.policy_errors += 1
            log.exception("policy %s failed at t=%.3fs; no decision this event",
                          getattr(self.policy, "name", "?"), now_s)
            return Decision(memory=self.memory)
        self.decision_ms.append((time.perf_counter() - t0) * 1000.0)
        self.counters.decisions += 1
        self._decided_workers = list(view.workers.values())
        self._extremes = None
        self.memory = decision.memory
        if self.on_decision is not None:
            self.on_decision(view, decision)
        if not decision.empty:
            self._apply(decision, now_s)
        return decision

    def _apply(self, d: Decision, now_s: float) -> None:
        st = self.state
        for wid in d.cancel_release:
            if st.has_worker(wid) and st.worker(wid).state is WorkerState.DRAINING:
                st.set_worker_state(wid, WorkerState.READY, now_s)
            else:
                self._refuse(f"cancel_release {wid}: not a draining worker")
        for wid in d.release:
            self._release(wid, now_s)
        if d.scale_out:
            room = self.config.cluster.gpus - sum(1 for _ in st.worker_ids())
            n = min(d.scale_out, max(0, room))
            if n < d.scale_out:
                self._refuse(f"scale_out {d.scale_out}: capped at cluster.gpus={self.config.cluster.gpus}")
            for _ in range(n):
                self._start_worker(now_s, ready=False)
            if n:
                self._sample_workers(now_s)
        for sid in d.offloads:
            self._offload(sid, now_s)
        for m in d.migrations:
            self._migrate(m.session_id, m.src, m.dst, now_s)
        for p in d.placements:
            self._place(p.session_id, p.worker_id, now_s)
        for p in d.prefetches:
            self._prefetch(p.session_id, p.worker_id, now_s)

    def _place(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        st = self.state
        if not st.has_session(sid) or st.session(sid).state is not SessionState.QUEUED:
            return self._refuse(f"place {sid} -> {wid}: session is not pending")
        if not st.has_worker(wid) or st.worker(wid).state is not WorkerState.READY:
            return self._refuse(f"place {sid} -> {wid}: worker is not ready")
        if not st.fits(sid, wid):
            return self._refuse(f"place {sid} -> {wid}: not enough free memory")
        from_host = st.placed_ever(sid)
        due_since_s = st.pending_since(sid)
        st.place(sid, wid, now_s)
        self.counters.placements += 1
        self.counters.resumes += 1 if from_host else 0
        sv = st.session(sid)
        self.transport.place(sid, sv.spec, st.prompt(sid), wid, now_s, from_host=from_host,
                             active=True, chunks_wanted=st.chunks_wanted(sid), due_since_s=due_since_s)

    def _prefetch(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        st = self.state
        if not st.has_session(sid):
            return self._refuse(f"prefetch {sid}: unknown session")
        sv = st.session(sid)
        if sv.state is not SessionState.OFFLOADED or not st.placed_ever(sid):
            return self._refuse(f"prefetch {sid}: it is {sv.state.value}, not idle in host memory")
        if not st.has_worker(wid) or st.worker(wid).state is not WorkerState.READY:
            return self._refuse(f"prefetch {sid} -> {wid}: worker is not ready")
        if not st.fits(sid, wid):
            return self._refuse(f"prefetch {sid} -> {wid}: not enough free memory")
        st.prefetch(sid, wid, now_s)
        self.counters.prefetches += 1
        self.transport.place(sid, sv.spec, st.prompt(sid), wid, now_s, from_host=True, active=False,
                             chunks_wanted=0)

    def _migrate(self, sid: SessionId, src: WorkerId, dst: WorkerId, now_s: float) -> None:
        st = self.state
        if not st.has_session(sid):
            return self._refuse(f"migrate {sid}: unknown session")
        sv = st.session(sid)
        if sv.worker != src or sv.state not in (SessionState.ACTIVE, SessionState.IDLE) or st.is_offloading(sid):
            return self._refuse(f"migrate {sid}: it is {sv.state.value} on {sv.worker}, not resident on {src}")
        if src == dst or not st.has_worker(dst) or st.worker(dst).state is not WorkerState.READY:
            return self._refuse(f"migrate {sid} -> {dst}: destination is not a ready worker")
        if not st.fits(sid, dst):
            return self._refuse(f"migrate {sid} -> {dst}: not enough free memory")
        st.begin_migration(sid, dst, now_s)
        self.transport.migrate(sid, src, dst, now_s)

    def _offload(self, sid: SessionId, now_s: float) -> None:
        st = self.state
        if not st.has_session(sid):
            return self._refuse(f"offload {sid}: unknown session")
        sv = st.session(sid)
        if sv.state is not SessionState.IDLE or st.is_offloading(sid) or sv.worker is None:
            return self._refuse(f"offload {sid}: it is {sv.state.value}, not idle on a worker")
        st.begin_offload(sid, now_s)
        self.transport.offload(sid, sv.worker, now_s)

    def _release(self, wid: WorkerId, now_s: float) -> None:
        st = self.state
        if not st.has_worker(wid):
            return self._refuse(f"release {wid}: unknown worker")
        w = st.worker(wid)
        if w.state is WorkerState.DRAINING:
            return
        was_up = w.state is WorkerState.READY
        st.set_worker_state(wid, WorkerState.DRAINING, now_s)
        if not was_up:  # a starting worker holds nothing: it goes at once
            self._ready += 1  # balanced by the decrement in _maybe_release
        self._maybe_release(wid, now_s)

    def _maybe_release(self, wid: WorkerId, now_s: float) -> None:
        st = self.state
        if not st.has_worker(wid):
            return
        w = st.worker(wid)
        if w.state is not WorkerState.DRAINING or w.sessions:
            return
        st.remove_worker(wid)
        self._decided_load.pop(wid, None)
        self._ready -= 1
        self.counters.workers_released += 1
        self.transport.release_worker(wid, now_s)
        self._sample_workers(now_s)

    def _start_worker(self, now_s: float, *, ready: bool) -> WorkerId:
        wid = f"w{self._next_worker}"
        self._next_worker += 1
        self.state.add_worker(wid, now_s, self.worker_memory_bytes, ready=ready)
        self._ready += 1 if ready else 0
        self.counters.workers_started += 1
        self.transport.start_worker(wid, now_s, memory_bytes=self.worker_memory_bytes, ready=ready)
        return wid

    def _sample_workers(self, now_s: float) -> None:
        provisioned = sum(1 for _ in self.state.worker_ids())
        sample = (now_s, provisioned, self._ready)
        if self.worker_samples and self.worker_samples[-1][0] == now_s:
            self.worker_samples[-1] = sample
        else:
            self.worker_samples.append(sample)

    def _refuse(self, why: str) -> None:
        self.counters.refused += 1
        self.refusals.append(f"t={self.now_s:.3f}s {why}")
        log.info("refused: %s", why)

    def _fail(self, sid: SessionId, why: str) -> None:
        self.failed[sid] = why
        self.counters.sessions_failed += 1
        log.warning("session %s failed: %s", sid, why)


def _worker_memory(model: LatencyModel, config: TurboConfig, shape: str | None) -> int:
    total = config.cluster.gpu_memory_bytes
    if shape is not None:
        try:
            return max(0, total - int(model.shape(shape).weights_bytes))
        except (KeyError, ValueError, LookupError):
            pass
    return total


__all__ = ["Controller", "ControllerCounters", "LOAD_CHANGE_TO_DECIDE"]
