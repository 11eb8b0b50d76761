"""`LocalTransport`: the live transport of the embedded server, one engine per local device.

In: the controller's commands (start/release a worker, place, migrate, offload, activate,
pause, close) on the controller's thread, and `set_prompt` from the runtime.
Out: events through `emit` (`WorkerReady`, `RoundCompleted`, `SessionPaused` when a
period's chunks are done, `MigrationFinished`, `OffloadFinished`, `RestoreFinished`,
`WorkerLost`) and every finished round (`on_round(worker_id, RoundOutcome)`, with frames)
to the runtime.

Each worker is an `EngineCore` owned by one thread (an actor): commands are closures
posted to its inbox and run between rounds, so an engine is only ever touched by its own
thread and every command lands at a chunk boundary. The thread runs rounds back to back
while work is due and sleeps on its inbox otherwise; torch releases the GIL inside
kernels, so engines on different devices (or CPU engines) run in parallel.

Devices: `devices` lists the slots (e.g. `["cuda:0", "cuda:1"]`, or `["cpu"] * N` for N CPU
engines). Scaling out takes a free slot and builds an engine there (the model load is the
start-up delay); scaling in stops the engine and frees the slot, so the policy can enable
and disable engines within the devices present, never beyond.

Migration (same process): hold the session on the source at a chunk boundary, export its
state, copy it onto the destination's device (`engine.transfer.device_copy`: a real copy,
never an alias), import it there with its due time kept (so downtime shows in latency),
then remove it from the source. A destination that cannot take it aborts the migration and
the session runs on at the source. Pre-copy is skipped: an in-process copy is the whole
downtime and is measured as such.
"""

from __future__ import annotations

import logging
import queue
from concurrent.futures import Future
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..engine.core import EngineCore, RoundOutcome
from ..engine.executor import Executor
from ..events import (Event, MigrationFinished, OffloadFinished, RestoreFinished, SessionFailed,
                      SessionPaused, WorkerLost, WorkerReady)
from ..types import SessionId, SessionSpec, WorkerId
from .transport import LandingCommands

log = logging.getLogger(__name__)

ExecutorFactory = Callable[[WorkerId, str], Executor]  # (worker id, device) -> executor
RoundHook = Callable[[WorkerId, RoundOutcome], None]
Clock = Callable[[], float]


@dataclass
class _Worker:
    wid: WorkerId
    device: str
    slot: int
    inbox: "queue.SimpleQueue[Callable[[], None] | None]" = field(default_factory=queue.SimpleQueue)
    engine: EngineCore | None = None
    thread: threading.Thread | None = None
    last_round_ms: float = 0.0
    rounds: int = 0
    stopped: bool = False


class LocalTransport:
    def __init__(self, make_executor: ExecutorFactory, devices: Sequence[str], *, clock: Clock,
                 max_batch: int = 32, model=None, on_round: RoundHook | None = None):
        if not devices:
            raise ValueError("LocalTransport needs at least one device slot")
        self._make_executor = make_executor
        self.devices = list(devices)
        self._clock = clock
        self._max_batch = max_batch
        self._model = model
        self._on_round = on_round
        self._emit: Callable[[Event], None] = lambda e: None
        self._workers: dict[WorkerId, _Worker] = {}
        self._slots: list[WorkerId | None] = [None] * len(self.devices)
        self._where: dict[SessionId, WorkerId] = {}  # engine holding the session's state
        self._prompts: dict[SessionId, str] = {}  # prompt to apply when the state lands
        self._moving: dict[SessionId, bool] = {}  # in-flight migrations -> closed meanwhile
        self._landing = LandingCommands()  # commands for sessions whose state is still landing
        self._parked: dict[SessionId, object] = {}  # host state of sessions whose worker was released
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ wiring
    def bind(self, emit: Callable[[Event], None]) -> None:
        self._emit = emit

    def set_round_hook(self, on_round: RoundHook) -> None:
        self._on_round = on_round

    def worker_devices(self) -> dict[WorkerId, str]:
        with self._lock:
            return {w.wid: w.device for w in self._workers.values()}

    def worker_stats(self) -> dict[WorkerId, dict]:
        with self._lock:
            return {w.wid: {"device": w.device, "last_round_ms": w.last_round_ms, "rounds": w.rounds}
                    for w in self._workers.values()}

    def location(self, sid: SessionId) -> WorkerId | None:
        with self._lock:
            return self._where.get(sid)

    # ------------------------------------------------------------------ workers
    def start_worker(self, wid: WorkerId, now_s: float, *, memory_bytes: int, ready: bool = False) -> None:
        with self._lock:
            if self._closed or wid in self._workers:
                return
            try:
                slot = self._slots.index(None)
            except ValueError:
                slot = -1
            if slot < 0:
                lost = True
            else:
                lost = False
                w = _Worker(wid, self.devices[slot], slot)
                self._slots[slot] = wid
                self._workers[wid] = w
        if lost:
            log.warning("no free device for worker %s (%d slots in use)", wid, len(self.devices))
            self._emit(WorkerLost(self._clock(), wid))
            return
        if ready:  # bootstrap: the controller counts it ready now, so build it now
            w.engine = self._build_engine(w, memory_bytes)
            self._spawn(w)
            self._emit(WorkerReady(self._clock(), wid))
        else:
            def build():
                try:
                    w.engine = self._build_engine(w, memory_bytes)
                except Exception:  # noqa: BLE001 - a failed start is a lost worker
                    log.exception("worker %s failed to start on %s", wid, w.device)
                    self._free(w)
                    self._emit(WorkerLost(self._clock(), wid))
                    w.stopped = True
                    return
                self._emit(WorkerReady(self._clock(), wid))
            self._spawn(w, before=build)

    def _build_engine(self, w: _Worker, memory_bytes: int) -> EngineCore:
        executor = self._make_executor(w.wid, w.device)
        return EngineCore(w.wid, executor, memory_bytes=memory_bytes, max_batch=self._max_batch,
                          model=self._model)

    def release_worker(self, wid: WorkerId, now_s: float) -> None:
        w = self._workers.get(wid)
        if w is not None:
            w.inbox.put(None)  # the loop exits after the commands posted before it

    def _free(self, w: _Worker) -> None:
        with self._lock:
            if self._slots[w.slot] == w.wid:
                self._slots[w.slot] = None
            self._workers.pop(w.wid, None)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every engine thread (server shutdown)."""
        with self._lock:
            self._closed = True
            workers = list(self._workers.values())
        for w in workers:
            w.inbox.put(None)
        for w in workers:
            if w.thread is not None and w.thread is not threading.current_thread():
                w.thread.join(timeout_s)

    # ------------------------------------------------------------------ engine thread
    def _spawn(self, w: _Worker, before: Callable[[], None] | None = None) -> None:
        w.thread = threading.Thread(target=self._loop, args=(w, before), name=f"engine-{w.wid}",
                                    daemon=True)
        w.thread.start()

    def _loop(self, w: _Worker, before: Callable[[], None] | None) -> None:
        if before is not None:
            before()
            if w.stopped:
                return
        engine = w.engine
        while True:
            # Commands first: they land at a chunk boundary, between rounds.
            try:
                cmd = w.inbox.get_nowait() if engine.has_due_work() else w.inbox.get(timeout=0.5)
            except queue.Empty:
                cmd = _NOTHING
            if cmd is None:
                self._park_offloaded(w)
                break
            if cmd is not _NOTHING:
                self._run(w, cmd)
                continue
            if not engine.has_due_work():
                continue
            try:
                outcome = engine.step(self._clock)
            except Exception:  # noqa: BLE001 - the engine isolates session errors; this is a bug
                log.exception("worker %s: round failed", w.wid)
                time.sleep(0.1)
                continue
            if outcome is None:
                continue
            w.last_round_ms = outcome.duration_ms
            w.rounds += 1
            for sid in outcome.failed:
                with self._lock:
                    if self._where.get(sid) == w.wid:
                        self._where.pop(sid, None)
            if self._on_round is not None:
                try:
                    self._on_round(w.wid, outcome)
                except Exception:  # noqa: BLE001 - a listener bug must not stop the engine
                    log.exception("worker %s: round hook failed", w.wid)
            self._emit(outcome.to_event())
            for sid in outcome.became_idle:
                self._emit(SessionPaused(outcome.finished_s, sid))
        self._free(w)

    def _park_offloaded(self, w: _Worker) -> None:
        """A released engine may still hold idle sessions in its host tier (the policy only
        waits for GPU-resident ones): keep their state in the transport until a placement
        brings them back, so releasing a worker never loses a session."""
        engine = w.engine
        for sid in engine.snapshot().offloaded:
            try:
                blob = engine.export(sid)
            except Exception:  # noqa: BLE001
                log.exception("worker %s: could not keep offloaded session %s", w.wid, sid)
                self._emit(SessionFailed(self._clock(), sid, f"its worker {w.wid} was released", w.wid))
                continue
            with self._lock:
                self._parked[sid] = blob
                if self._where.get(sid) == w.wid:
                    self._where.pop(sid, None)

    def take_parked(self, sid: SessionId):
        """The state of an offloaded session whose worker was released, or None."""
        with self._lock:
            return self._parked.pop(sid, None)

    def park(self, blob) -> None:
        with self._lock:
            self._parked[blob.session_id] = blob

    def _run(self, w: _Worker, cmd: Callable[[], None]) -> None:
        try:
            cmd()
        except Exception:  # noqa: BLE001 - commands report their own failures; log the rest
            log.exception("worker %s: command failed", w.wid)

    def note_location(self, sid: SessionId, wid: WorkerId | None) -> None:
        """Record where a session's state now is after a move done through `call`; a
        prompt set meanwhile is applied there."""
        with self._lock:
            if wid is None:
                self._where.pop(sid, None)
                return
            self._where[sid] = wid
        self._post(wid, lambda e: self._apply_pending_prompt(e, sid))

    def call(self, wid: WorkerId, fn: Callable[[EngineCore], object]) -> "Future":
        """Run `fn(engine)` on the worker's thread at its next chunk boundary; the future
        holds what it returns (or raises). For transports that orchestrate engines from
        outside (the Ray actor host)."""
        fut: Future = Future()

        def run(engine: EngineCore):
            try:
                fut.set_result(fn(engine))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)
        if not self._post(wid, run):
            fut.set_exception(RuntimeError(f"worker {wid} is gone"))
        return fut

    def _post(self, wid: WorkerId | None, cmd: Callable[[EngineCore], None]) -> bool:
        w = self._workers.get(wid) if wid is not None else None
        if w is None:
            return False
        w.inbox.put(lambda: cmd(w.engine))
        return True

    # ------------------------------------------------------------------ sessions
    def place(self, sid: SessionId, spec: SessionSpec, prompt: str, wid: WorkerId, now_s: float, *,
              from_host: bool, active: bool, chunks_wanted: int,
              due_since_s: float | None = None) -> None:
        due = now_s if due_since_s is None else min(due_since_s, now_s)  # waited for a GPU since
        def failed(why: str):
            self._emit(SessionFailed(self._clock(), sid, why, wid))

        if not from_host:
            def add(engine: EngineCore):
                try:
                    engine.add_session(sid, spec, prompt, self._clock(), active=active,
                                       chunks_wanted=chunks_wanted, due_since_s=due)
                except Exception as e:  # noqa: BLE001 - no memory, a spec the model refuses
                    failed(f"placement on {wid} failed: {type(e).__name__}: {e}")
                    return
                with self._lock:
                    self._where[sid] = wid
                self._apply_pending_prompt(engine, sid)
            if not self._post(wid, add):
                failed(f"worker {wid} is gone")
            return
        def landing(parked_blob) -> Callable[[EngineCore], None]:
            """A command for `wid` that imports a host copy of the session there."""
            blob = _copy_to(parked_blob, self._workers[wid].device if wid in self._workers else "cpu")

            def land(dst: EngineCore):
                try:
                    dst.import_session(blob, now_s, active=active, chunks_wanted=chunks_wanted,
                                       due_since_s=due)
                except Exception as e:  # noqa: BLE001
                    self._landing.dropped(sid)
                    failed(f"restore on {wid} failed: {type(e).__name__}: {e}")
                    return
                with self._lock:
                    self._where[sid] = wid
                self._apply_pending_prompt(dst, sid)
                for command in self._landing.landed(sid):
                    command(dst)
                self._emit(RestoreFinished(self._clock(), sid, wid, blob.nbytes))
            return land

        parked = self.take_parked(sid)
        if parked is not None:
            self._landing.expect(sid)
            if not self._post(wid, landing(parked)):
                self._landing.dropped(sid)
                self.park(parked)
                failed(f"worker {wid} is gone")
            return
        holder = self.location(sid)
        if holder == wid:
            def restore(engine: EngineCore):
                try:
                    result = engine.restore(sid, now_s)
                except Exception as e:  # noqa: BLE001
                    failed(f"restore on {wid} failed: {type(e).__name__}: {e}")
                    return
                self._apply_pending_prompt(engine, sid)
                if active:
                    engine.activate(sid, now_s, chunks_wanted, due_since_s=due)
                self._emit(RestoreFinished(self._clock(), sid, wid, result.nbytes))
            self._post(wid, restore)
            return
        # Offloaded on another engine: take its host copy there and import it here.
        def export(engine: EngineCore):
            blob = engine.export(sid)
            with self._lock:
                self._where.pop(sid, None)
            if not self._post(wid, landing(blob)):
                self._landing.dropped(sid)
                failed(f"worker {wid} is gone")
        self._landing.expect(sid)
        if not self._post(holder, export):
            self._landing.dropped(sid)
            failed(f"the worker holding its state ({holder}) is gone")

    def migrate(self, sid: SessionId, src: WorkerId, dst: WorkerId, now_s: float) -> None:
        def abort(reason: str):
            self._emit(MigrationFinished(self._clock(), sid, src, dst, ok=False, reason=reason))

        if dst not in self._workers:
            abort("dst_lost")
            return

        def stop_and_copy(engine: EngineCore):
            if sid not in engine:
                abort("session_closed")
                return
            started = self._clock()
            with self._lock:
                self._moving[sid] = False
            info = engine.info(sid)
            engine.hold(sid)
            try:
                blob = _copy_to(engine.export(sid, keep=True), self._workers[dst].device)
            except Exception as e:  # noqa: BLE001
                engine.unhold(sid, self._clock())
                abort(f"transfer_failed: {e}")
                return

            def land(dst_engine: EngineCore):
                with self._lock:
                    closed = self._moving.pop(sid, False)
                if closed:
                    abort("session_closed")
                    return
                try:
                    dst_engine.import_session(blob, self._clock(), active=info.active,
                                              chunks_wanted=info.chunks_wanted,
                                              due_since_s=info.due_since_s)
                except Exception as e:  # noqa: BLE001 - no memory, bad spec: abort, keep source
                    reason = "dst_no_memory" if "PoolFull" in type(e).__name__ else f"transfer_failed: {e}"
                    self._post(src, lambda s: (s.unhold(sid, self._clock()), abort(reason)))
                    return
                with self._lock:
                    self._where[sid] = dst
                self._apply_pending_prompt(dst_engine, sid)
                downtime_ms = (self._clock() - started) * 1000.0

                def commit(src_engine: EngineCore):
                    if sid in src_engine:
                        src_engine.remove(sid)
                    self._emit(MigrationFinished(self._clock(), sid, src, dst, ok=True,
                                                 bytes_moved=blob.nbytes, downtime_ms=downtime_ms))
                if not self._post(src, commit):  # the source is gone: the move stands
                    self._emit(MigrationFinished(self._clock(), sid, src, dst, ok=True,
                                                 bytes_moved=blob.nbytes, downtime_ms=downtime_ms))
            if not self._post(dst, land):
                engine.unhold(sid, self._clock())
                abort("dst_lost")

        if not self._post(src, stop_and_copy):
            abort("src_lost")

    def offload(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        def do(engine: EngineCore):
            if sid not in engine:
                return
            result = engine.offload(sid)
            self._emit(OffloadFinished(self._clock(), sid, wid, result.nbytes))
        self._send(sid, wid, do)

    def activate(self, sid: SessionId, wid: WorkerId, now_s: float, chunks_wanted: int) -> None:
        self._send(sid, wid, lambda e: sid in e and e.activate(sid, now_s, chunks_wanted))

    def pause(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        self._send(sid, wid, lambda e: sid in e and e.pause(sid, now_s))

    def _send(self, sid: SessionId, wid: WorkerId, command: Callable[[EngineCore], object]) -> None:
        """Run `command` on `wid`'s engine, or once the session's state lands there."""
        if not self._landing.defer(sid, command):
            self._post(wid, command)

    def close(self, sid: SessionId, wid: WorkerId | None, now_s: float) -> None:
        with self._lock:
            if sid in self._moving:
                self._moving[sid] = True  # the landing side drops it
            self._parked.pop(sid, None)
        holder = self.location(sid) or wid

        def remove(engine: EngineCore):
            if sid in engine:
                engine.remove(sid)
            with self._lock:
                if self._where.get(sid) == holder:
                    self._where.pop(sid, None)
                self._prompts.pop(sid, None)
        self._send(sid, holder, remove)

    def set_prompt(self, sid: SessionId, prompt: str) -> None:
        """Takes effect from the session's next chunk, wherever its state is; a session in
        host memory or in flight gets it when its state lands on a GPU again."""
        with self._lock:
            self._prompts[sid] = prompt
            holder = self._where.get(sid)
        self._post(holder, lambda e: self._apply_pending_prompt(e, sid))

    def _apply_pending_prompt(self, engine: EngineCore, sid: SessionId) -> None:
        with self._lock:
            prompt = self._prompts.get(sid)
        if prompt is None or sid not in engine:
            return
        info = engine.info(sid)
        if info.tier.value != "gpu":
            return  # applied on restore
        engine.set_prompt(sid, prompt)
        with self._lock:
            if self._prompts.get(sid) == prompt:
                self._prompts.pop(sid, None)


_NOTHING = object()


def _copy_to(blob, device: str):
    """A real copy of the state onto the destination device (never aliases the source)."""
    if getattr(blob, "payload", None) is None:
        return blob  # profiled executors carry no tensors
    from ..engine.transfer import device_copy

    return device_copy(blob, device)
