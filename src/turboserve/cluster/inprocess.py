"""InProcessTransport: engines in a dict, every command's effect immediate.

In: the controller's commands (the `Transport` protocol) and, from a test or a simple
driver, `run_round` / `run_until` to let engines work on a clock the caller supplies.
Out: events through the bound `emit`: `WorkerReady`, `RoundCompleted`, `SessionPaused` (a
session's active period ended on its engine), `SessionFailed`, `MigrationFinished` (from
`engine.migration.Migration.run`), `OffloadFinished`, `RestoreFinished`, `WorkerLost`.

It is the reference implementation of the protocol and a base for others: an offloaded
session's host copy stays on the engine that offloaded it ("home") until it is placed
again; a session on a lost worker is rebuilt on its new worker from the checkpoint taken
when the worker was lost (`lose_worker`). Rounds run back to back per engine, each ending
at its start plus its (modelled or measured) duration.
"""

from __future__ import annotations

import logging
from typing import Callable

from ..config import TurboConfig
from ..events import (MigrationFinished, OffloadFinished, RestoreFinished, RoundCompleted,
                      SessionFailed, SessionPaused, WorkerLost, WorkerReady)
from ..policy.latency import LatencyModel
from ..types import SessionId, SessionSpec, WorkerId
from ..engine.core import EngineCore, RoundOutcome
from ..engine.executor import Executor, SessionBlob
from ..engine.migration import Migration, TransferFn, copy_transfer
from ..engine.profiled import ProfiledExecutor
from .transport import EmitFn

log = logging.getLogger("turboserve.inprocess")


class InProcessTransport:
    def __init__(self, model: LatencyModel, config: TurboConfig, *,
                 executor_factory: Callable[[WorkerId], Executor] | None = None,
                 transfer: TransferFn = copy_transfer, auto_ready: bool = True,
                 record: bool = True) -> None:
        """`executor_factory(wid)` makes each worker's executor (default: a
        `ProfiledExecutor` with tagged frames). With `auto_ready=False` a started worker
        becomes ready only when `make_ready` is called (start-up delay in tests).
        `record` keeps every RoundOutcome in `outcomes`."""
        self.model = model
        self.config = config
        self.executor_factory = executor_factory or (lambda wid: ProfiledExecutor(model, config, frames=True))
        self.transfer = transfer
        self.auto_ready = auto_ready
        self.record = record
        self.engines: dict[WorkerId, EngineCore] = {}
        self.clock_s: dict[WorkerId, float] = {}  # when each engine is next free
        self.outcomes: list[RoundOutcome] = []
        self.commands: list[tuple] = []  # (name, args...) of every command, for tests
        self._home: dict[SessionId, WorkerId] = {}  # offloaded session -> engine holding its host copy
        self._checkpoints: dict[SessionId, SessionBlob] = {}  # sessions of lost workers
        self._emit: EmitFn = lambda ev: None

    # ------------------------------------------------------------ Transport
    def bind(self, emit: EmitFn) -> None:
        self._emit = emit

    def start_worker(self, wid: WorkerId, now_s: float, *, memory_bytes: int, ready: bool = False) -> None:
        self.commands.append(("start_worker", wid, now_s))
        if wid in self.engines:
            raise ValueError(f"worker {wid!r} already started")
        self.engines[wid] = EngineCore(wid, self.executor_factory(wid), memory_bytes=memory_bytes,
                                       max_batch=self.config.engine.max_batch, model=self.model)
        self.clock_s[wid] = now_s
        if ready or self.auto_ready:
            self._emit(WorkerReady(now_s, wid))

    def make_ready(self, wid: WorkerId, now_s: float) -> None:
        self.clock_s[wid] = max(self.clock_s.get(wid, now_s), now_s)
        self._emit(WorkerReady(now_s, wid))

    def release_worker(self, wid: WorkerId, now_s: float) -> None:
        self.commands.append(("release_worker", wid, now_s))
        eng = self.engines.pop(wid, None)
        self.clock_s.pop(wid, None)
        if eng is None:
            return
        for sid in list(eng.table):
            # host copies of offloaded sessions outlive the GPU: keep them with the transport
            if self._home.get(sid) == wid:
                del self._home[sid]
                self._checkpoints[sid] = eng.export(sid)
            else:
                log.warning("released worker %s still held session %s", wid, sid)

    def place(self, sid: SessionId, spec: SessionSpec, prompt: str, wid: WorkerId, now_s: float, *,
              from_host: bool, active: bool, chunks_wanted: int,
              due_since_s: float | None = None) -> None:
        self.commands.append(("place", sid, wid, now_s, from_host))
        eng = self.engines.get(wid)
        if eng is None:
            return self._emit(SessionFailed(now_s, sid, f"worker {wid!r} is gone", wid))
        start = max(now_s, self.clock_s.get(wid, now_s))
        try:
            if not from_host:
                eng.add_session(sid, spec, prompt, start, active=active, chunks_wanted=chunks_wanted)
                return
            nbytes = self._bring_back(sid, eng, start, active, chunks_wanted)
        except Exception as e:  # noqa: BLE001 - one session's failure must not stop the loop
            return self._emit(SessionFailed(now_s, sid, f"{type(e).__name__}: {e}", wid))
        self._emit(RestoreFinished(now_s, sid, wid, nbytes))

    def migrate(self, sid: SessionId, src: WorkerId, dst: WorkerId, now_s: float) -> None:
        self.commands.append(("migrate", sid, src, dst, now_s))
        s_eng, d_eng = self.engines.get(src), self.engines.get(dst)
        if s_eng is None or sid not in s_eng:
            return self._emit(MigrationFinished(now_s, sid, src, dst, False, reason="src_lost"))
        if d_eng is None:
            return self._emit(MigrationFinished(now_s, sid, src, dst, False, reason="dst_lost"))
        mig = Migration(sid, s_eng, d_eng, link=self.config.link("gpu"), transfer=self.transfer)
        report = mig.run(now_s)
        self._emit(report.to_event())

    def offload(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        self.commands.append(("offload", sid, wid, now_s))
        eng = self.engines.get(wid)
        if eng is None or sid not in eng:
            return
        result = eng.offload(sid)
        self._home[sid] = wid
        self._emit(OffloadFinished(now_s, sid, wid, result.nbytes))

    def activate(self, sid: SessionId, wid: WorkerId, now_s: float, chunks_wanted: int) -> None:
        self.commands.append(("activate", sid, wid, now_s))
        eng = self.engines.get(wid)
        if eng is not None and sid in eng:
            eng.activate(sid, max(now_s, self.clock_s.get(wid, now_s)), chunks_wanted)

    def pause(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        self.commands.append(("pause", sid, wid, now_s))
        eng = self.engines.get(wid)
        if eng is not None and sid in eng:
            eng.pause(sid, now_s)

    def close(self, sid: SessionId, wid: WorkerId | None, now_s: float) -> None:
        self.commands.append(("close", sid, wid, now_s))
        self._checkpoints.pop(sid, None)
        for w in {wid, self._home.pop(sid, None)}:
            eng = self.engines.get(w) if w is not None else None
            if eng is not None and sid in eng:
                eng.remove(sid)
        for eng in self.engines.values():  # a migration's reservation, if one was left
            eng.cancel_reservation(sid)

    def set_prompt(self, sid: SessionId, wid: WorkerId, prompt: str) -> None:
        eng = self.engines.get(wid)
        if eng is not None and sid in eng:
            eng.set_prompt(sid, prompt)

    # ----------------------------------------------------- driving engines
    def run_round(self, wid: WorkerId, now_s: float | None = None) -> RoundOutcome | None:
        """One round on `wid` starting when the engine is free (or `now_s`, if later);
        delivered at start + duration. Emits its events; None when nothing is due."""
        eng = self.engines[wid]
        start = max(self.clock_s.get(wid, 0.0), now_s if now_s is not None else 0.0)
        rnd = eng.begin_round(start)
        if rnd is None:
            self.clock_s[wid] = start
            return None
        out = eng.finish_round(rnd, rnd.finish_s)
        self.clock_s[wid] = out.finished_s
        if self.record:
            self.outcomes.append(out)
        self._emit_outcome(out)
        return out

    def run_until(self, until_s: float, now_s: float = 0.0) -> int:
        """Run rounds in time order on every engine until each is idle or busy past
        `until_s`; events go to the controller as they happen. Returns rounds run."""
        rounds = 0
        for wid in self.engines:
            self.clock_s[wid] = max(self.clock_s.get(wid, now_s), now_s)
        while True:
            ready = [(self.clock_s[w], w) for w, e in self.engines.items()
                     if e.has_due_work() and self.clock_s[w] < until_s]
            if not ready:
                break
            _t, wid = min(ready)
            if self.run_round(wid) is not None:
                rounds += 1
        for wid in self.engines:
            self.clock_s[wid] = max(self.clock_s[wid], until_s)
        return rounds

    def lose_worker(self, wid: WorkerId, now_s: float) -> None:
        """Simulate a worker failure: checkpoint its sessions (what a real system keeps
        off-GPU), drop the engine, emit `WorkerLost`."""
        eng = self.engines.pop(wid)
        self.clock_s.pop(wid, None)
        for sid in list(eng.table):
            info = eng.info(sid)
            self._checkpoints[sid] = SessionBlob(sid, info.spec, info.prompt, info.chunk_index,
                                                 info.state_bytes)
            if self._home.get(sid) == wid:
                del self._home[sid]
        self._emit(WorkerLost(now_s, wid))

    # --------------------------------------------------------------- internals
    def _bring_back(self, sid: SessionId, eng: EngineCore, now_s: float, active: bool,
                    chunks_wanted: int) -> int:
        home = self._home.get(sid)
        if home == eng.worker_id:
            del self._home[sid]
            result = eng.restore(sid, now_s)
            if active:
                eng.activate(sid, now_s, chunks_wanted)
            return result.nbytes
        if home is not None and home in self.engines and sid in self.engines[home]:
            blob = self.engines[home].export(sid)
            del self._home[sid]
        elif sid in self._checkpoints:
            blob = self._checkpoints.pop(sid)  # rebuilt from its checkpoint
        else:
            raise LookupError(f"session {sid!r} has no host copy or checkpoint to restore from")
        return eng.import_session(self.transfer(blob), now_s, active=active, chunks_wanted=chunks_wanted)

    def _emit_outcome(self, out: RoundOutcome) -> None:
        emit = self._emit
        if out.session_ids:
            emit(RoundCompleted(out.finished_s, out.worker_id, out.session_ids, out.duration_ms))
        for sid in out.became_idle:
            emit(SessionPaused(out.finished_s, sid))
        for sid, why in out.failed.items():
            emit(SessionFailed(out.finished_s, sid, why, out.worker_id))
