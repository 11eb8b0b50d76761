"""SimTransport: the `cluster.transport.Transport` protocol over `EngineCore`s on a simulated clock.

In: the controller's commands (start/release a worker, place, migrate, offload, activate,
pause, close), each at the simulated time it is issued, and the items this transport put
on the event heap coming back due. Out: events to the controller through the bound
`emit` (`WorkerReady`, `RoundCompleted`, `SessionPaused`, `SessionFailed`,
`MigrationFinished`, `OffloadFinished`, `RestoreFinished`), chunk latencies and mechanism
counts into `RunMetrics`, and `on_idle(time_s, sid)` to the trace driver when a session's
active period is done.

What takes time, and how long:
- a worker is billed from `start_worker` and takes `cluster.startup_delay_s` to be ready
  (bootstrap workers are ready at once);
- each worker runs rounds back to back: `EngineCore.begin_round` at t, delivery at
  t + the profiled duration, the next round at once if work is due;
- migration is `engine.migration.Migration`: pre-copy over the GPU link (alpha-beta)
  while the session keeps running, hold at a chunk boundary, stop-and-copy of the delta
  (the downtime, visible in the session's next chunk latency), commit;
- offload takes the host link's time before the GPU memory is free; a restore takes it
  before the session runs again (its due clock runs meanwhile);
- memory limits are the engines' own (`PoolFullError` -> the session fails, visibly).

Speed: a worker whose rounds repeat unchanged runs them without going through the heap
one by one; see `sim/cruise.py` — results equal the round-by-round run.
"""

from __future__ import annotations

import logging
import zlib
from typing import Callable

from ..config import TurboConfig
from ..engine.core import EngineCore, InFlightRound, RoundOutcome
from ..engine.executor import SessionBlob
from ..engine.migration import Migration
from ..engine.profiled import ProfiledExecutor, SharedHost
from ..engine.session_table import Tier
from ..engine.state_pool import PoolFullError
from ..events import (Event, MigrationFinished, OffloadFinished, RestoreFinished, RoundCompleted,
                      SessionFailed, SessionPaused, WorkerReady)
from ..policy.latency import LatencyModel, transfer_ms
from ..types import SessionId, SessionSpec, WorkerId
from . import cruise as cruising
from .loop import EventLoop
from .metrics import RunMetrics

log = logging.getLogger("turboserve.sim")


class _SimWorker:
    __slots__ = ("wid", "engine", "ready", "released", "rnd", "waiting_stop", "dirty", "cruise", "gen")

    def __init__(self, wid: WorkerId, engine: EngineCore) -> None:
        self.wid = wid
        self.engine = engine
        self.ready = False
        self.released = False
        self.rnd: InFlightRound | None = None  # the round in flight, if any
        self.waiting_stop: list[SessionId] = []  # migrations waiting for a chunk boundary here
        self.dirty = False  # may have due work and no round in flight
        self.cruise: cruising.Cruise | None = None  # identical rounds run in one step
        self.gen = 0


class SimTransport:
    def __init__(self, loop: EventLoop, model: LatencyModel, config: TurboConfig, metrics: RunMetrics,
                 *, frames: bool = False, cruise: bool = True,
                 on_outcome: Callable[[RoundOutcome], None] | None = None) -> None:
        self.loop = loop
        self.model = model
        self.config = config
        self.metrics = metrics
        self.frames = frames
        self.on_outcome = on_outcome  # every finished round (tests check delivery order)
        self.on_idle: Callable[[float, SessionId], None] = lambda t, sid: None
        self._emit: Callable[[Event], None] = lambda ev: None
        self.workers: dict[WorkerId, _SimWorker] = {}
        self._where: dict[SessionId, WorkerId] = {}  # engine holding the session's state
        self._host_blobs: dict[SessionId, SessionBlob] = {}  # host copies outliving their worker
        self._migrations: dict[SessionId, tuple[Migration, _SimWorker, _SimWorker]] = {}
        self._first_chunk: set[SessionId] = set()  # next chunk starts an active period
        self._dirty: list[_SimWorker] = []
        self._gpu_link = config.link("gpu")
        self._host_link = config.link("host")
        self._startup_s = config.cluster.startup_delay_s
        self._max_batch = config.engine.max_batch
        # the simulated workers share one host, as the CPU engines whose rounds a profile's
        # `jitter_shared` was calibrated on do (a GPU calibration shows no difference)
        self._host = SharedHost(lambda: self.loop.now_s)
        self._ready_count = 0
        self.rounds = 0
        # Cruise needs a way (set by the driver) to count the chunks of rounds run in one
        # step into the controller's state. Without it, or with per-round hooks or frames,
        # every round goes through the heap.
        self.cruise_enabled = cruise and not frames and on_outcome is None \
            and not getattr(model, "has_jitter", False)  # drawn round times are never identical
        self.apply_rounds: Callable[[WorkerId, tuple[SessionId, ...], float, int], None] | None = None
        # (worker, completion s): a bulk-run round that changed nothing but the worker's phase
        self.note_phase: Callable[[WorkerId, float], None] | None = None
        self._cruising: dict[WorkerId, _SimWorker] = {}
        self._saturated: dict[str, float] = {}
        self.cruised_rounds = 0

    # ------------------------------------------------------------------ wiring
    def bind(self, emit: Callable[[Event], None]) -> None:
        self._emit = emit

    def flush(self, now_s: float) -> None:
        """Start a round on every worker that got due work during the item just handled.
        Deferred to the end of the item so that all commands of one decision land before
        the round is formed (as they would between two rounds of a live engine)."""
        dirty = self._dirty
        while dirty:
            w = dirty.pop()
            w.dirty = False
            if w.rnd is None and w.ready and not w.released:
                self._begin(w, now_s)

    def _settled(self, w: _SimWorker | None, now_s: float) -> _SimWorker | None:
        """The worker with its engine exact at now_s (ends a cruise); None passes through."""
        if w is not None and w.cruise is not None:
            self._settle(w, now_s)
        return w

    def _touch(self, w: _SimWorker) -> None:
        if not w.dirty:
            w.dirty = True
            self._dirty.append(w)

    def _gpus_changed(self, now_s: float) -> None:
        self.metrics.gpus_changed(now_s, len(self.workers), self._ready_count)

    # ------------------------------------------------------------------ workers
    def start_worker(self, wid: WorkerId, now_s: float, *, memory_bytes: int, ready: bool = False) -> None:
        if wid in self.workers:
            raise ValueError(f"worker {wid!r} already started")
        # each worker its own seeded draws of round-time jitter (profiles that have it)
        seed = zlib.crc32(f"{self.config.sim.seed}:{wid}".encode())
        executor = ProfiledExecutor(self.model, self.config, frames=self.frames, seed=seed, host=self._host)
        engine = EngineCore(wid, executor,
                            memory_bytes=memory_bytes, max_batch=self._max_batch, model=self.model)
        w = self.workers[wid] = _SimWorker(wid, engine)
        if ready:
            self._worker_up(now_s, w)
        else:
            self._gpus_changed(now_s)
            self.loop.push(now_s + self._startup_s, (self._worker_up, w))

    def _worker_up(self, now_s: float, w: _SimWorker) -> None:
        if w.released or w.ready:
            return
        w.ready = True
        self._ready_count += 1
        self._gpus_changed(now_s)
        self._emit(WorkerReady(now_s, w.wid))
        self._touch(w)

    def release_worker(self, wid: WorkerId, now_s: float) -> None:
        w = self.workers.pop(wid, None)
        if w is None:
            return
        w.released = True
        if w.ready:
            self._ready_count -= 1
        eng = w.engine
        for sid in list(eng.table):
            info = eng.info(sid)
            if info.tier is Tier.HOST:  # host copies outlive the GPU
                self._host_blobs[sid] = eng.export(sid)
                self._where.pop(sid, None)
            else:
                log.warning("released worker %s still held session %s", wid, sid)
        self._gpus_changed(now_s)

    @property
    def provisioned(self) -> int:
        return len(self.workers)

    @property
    def ready(self) -> int:
        return self._ready_count

    # ------------------------------------------------------------------ sessions
    def place(self, sid: SessionId, spec: SessionSpec, prompt: str, wid: WorkerId, now_s: float, *,
              from_host: bool, active: bool, chunks_wanted: int,
              due_since_s: float | None = None) -> None:
        due = now_s if due_since_s is None else min(due_since_s, now_s)  # waited for a GPU since
        w = self._settled(self.workers.get(wid), now_s)
        if w is None or w.released:
            return self._emit(SessionFailed(now_s, sid, f"worker {wid!r} is gone", wid))
        eng = w.engine
        try:
            if not from_host:
                eng.add_session(sid, spec, prompt, now_s, active=active, chunks_wanted=chunks_wanted,
                                due_since_s=due)
                self._where[sid] = wid
                if active:
                    self._first_chunk.add(sid)
                    self._touch(w)
                return
            restore_ms = self._bring_back(sid, w, now_s, active, chunks_wanted, due)
        except PoolFullError as e:
            return self._emit(SessionFailed(now_s, sid, f"out of GPU memory on {wid}: {e}", wid))
        except Exception as e:  # noqa: BLE001 - one session's failure must not stop the run
            return self._emit(SessionFailed(now_s, sid, f"{type(e).__name__}: {e}", wid))
        if active:
            self._first_chunk.add(sid)
        # the state is on its way to the GPU: the session waits (held) until it lands
        eng.hold(sid)
        self.loop.push(now_s + restore_ms / 1000.0, (self._restored, (sid, w)))

    def _bring_back(self, sid: SessionId, w: _SimWorker, now_s: float, active: bool, chunks_wanted: int,
                    due: float) -> float:
        """Put an off-GPU session's state on `w`'s GPU tier; returns the copy time (ms)."""
        eng = w.engine
        home = self._where.get(sid)
        if home == w.wid and sid in eng:
            result = eng.restore(sid, now_s)
            if active:
                eng.activate(sid, now_s, chunks_wanted, due_since_s=due)
            return result.duration_ms
        if home is not None and home in self.workers and sid in self.workers[home].engine:
            blob = self._settled(self.workers[home], now_s).engine.export(sid)
        elif sid in self._host_blobs:
            blob = self._host_blobs.pop(sid)
        else:
            raise LookupError(f"session {sid!r} has no host copy to restore from")
        eng.import_session(blob, now_s, active=active, chunks_wanted=chunks_wanted, due_since_s=due)
        self._where[sid] = w.wid
        return transfer_ms(blob.nbytes, self._host_link.alpha_ms, self._host_link.bandwidth_gbps)

    def _restored(self, now_s: float, arg: tuple[SessionId, _SimWorker]) -> None:
        sid, w = arg
        if w.released or sid not in w.engine:
            return  # closed (or its worker went) while the copy ran
        self._settled(w, now_s)
        w.engine.unhold(sid, now_s)
        nbytes = w.engine.info(sid).state_bytes
        self.metrics.record_restore(nbytes)
        self._emit(RestoreFinished(now_s, sid, w.wid, nbytes))
        self._touch(w)

    def activate(self, sid: SessionId, wid: WorkerId, now_s: float, chunks_wanted: int) -> None:
        w = self._settled(self.workers.get(wid), now_s)
        if w is None or sid not in w.engine:
            return
        was_active = w.engine.info(sid).active
        w.engine.activate(sid, now_s, chunks_wanted)
        if not was_active:
            self._first_chunk.add(sid)
        self._touch(w)

    def pause(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        w = self._settled(self.workers.get(wid), now_s)
        if w is not None and sid in w.engine:
            w.engine.pause(sid, now_s)
            self._first_chunk.discard(sid)

    def close(self, sid: SessionId, wid: WorkerId | None, now_s: float) -> None:
        self._first_chunk.discard(sid)
        self._host_blobs.pop(sid, None)
        mig = self._migrations.pop(sid, None)
        if mig is not None:
            m, src, dst = mig
            if not m.done:
                m.abort("session_closed", now_s)
            if sid in src.waiting_stop:
                src.waiting_stop.remove(sid)
        holder = self._where.pop(sid, None)
        for w_id in (wid, holder) if holder != wid else (wid,):  # a list, not a set: fixed order
            w = self._settled(self.workers.get(w_id), now_s) if w_id is not None else None
            if w is not None and sid in w.engine:
                w.engine.remove(sid)
        for w in self.workers.values():  # a reservation left by an aborted migration
            w.engine.cancel_reservation(sid)

    # ------------------------------------------------------------------ offload
    def offload(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        w = self.workers.get(wid)
        if w is None or sid not in w.engine:
            return
        nbytes = w.engine.info(sid).state_bytes
        ms = transfer_ms(nbytes, self._host_link.alpha_ms, self._host_link.bandwidth_gbps)
        # the GPU memory is held until the copy is done
        self.loop.push(now_s + ms / 1000.0, (self._offloaded, (sid, w)))

    def _offloaded(self, now_s: float, arg: tuple[SessionId, _SimWorker]) -> None:
        sid, w = arg
        eng = w.engine
        if w.released or sid not in eng:
            return
        self._settled(w, now_s)
        info = eng.info(sid)
        if info.in_flight and w.rnd is not None:  # offload at the chunk boundary
            self.loop.push(w.rnd.finish_s, (self._offloaded, arg))
            return
        if info.tier is not Tier.GPU:  # already on the host tier: nothing left to copy
            self._emit(OffloadFinished(now_s, sid, w.wid, 0))
            return
        result = eng.offload(sid)
        self.metrics.record_offload(result.nbytes)
        self._emit(OffloadFinished(now_s, sid, w.wid, result.nbytes))

    # ------------------------------------------------------------------ migration
    def migrate(self, sid: SessionId, src: WorkerId, dst: WorkerId, now_s: float) -> None:
        ws, wd = self._settled(self.workers.get(src), now_s), self._settled(self.workers.get(dst), now_s)
        if ws is None or sid not in ws.engine:
            return self._migration_failed(now_s, sid, src, dst, "src_lost")
        if wd is None or not wd.ready:
            return self._migration_failed(now_s, sid, src, dst, "dst_lost")
        if sid in self._migrations:
            return self._migration_failed(now_s, sid, src, dst, "transfer_failed")
        m = Migration(sid, ws.engine, wd.engine, link=self._gpu_link)
        precopy_ms = m.start(now_s)
        if m.done:
            return self._migration_done(now_s, m)
        self._migrations[sid] = (m, ws, wd)
        self.loop.push(now_s + precopy_ms / 1000.0, (self._precopied, sid))

    def _precopied(self, now_s: float, sid: SessionId) -> None:
        mig = self._migrations.get(sid)
        if mig is None:
            return
        m, ws, wd = mig
        self._settled(ws, now_s)
        if wd.released:
            self._migrations.pop(sid)
            m.abort("dst_lost", now_s)
            return self._migration_done(now_s, m)
        if m.begin_stop():
            self._stop_and_copy(now_s, sid)
        else:  # its chunk is in flight: stop at the end of that round
            ws.waiting_stop.append(sid)

    def _stop_and_copy(self, now_s: float, sid: SessionId) -> None:
        m, ws, wd = self._migrations[sid]
        self._settled(ws, now_s)
        downtime_ms = m.stop_and_copy(now_s)
        if m.done:
            self._migrations.pop(sid)
            self._touch(ws)
            return self._migration_done(now_s, m)
        self.loop.push(now_s + downtime_ms / 1000.0, (self._commit, sid))

    def _commit(self, now_s: float, sid: SessionId) -> None:
        mig = self._migrations.pop(sid, None)
        if mig is None:
            return
        m, ws, wd = mig
        self._settled(ws, now_s)
        self._settled(wd, now_s)
        if wd.released:
            m.abort("dst_lost", now_s)
        else:
            m.commit(now_s)
        if m.report is not None and m.report.ok:
            self._where[sid] = wd.wid
        self._touch(ws)
        self._touch(wd)
        self._migration_done(now_s, m)

    def _migration_done(self, now_s: float, m: Migration) -> None:
        rep = m.report
        assert rep is not None
        self.metrics.record_migration(rep.ok, rep.bytes_moved, rep.downtime_ms)
        self._emit(MigrationFinished(now_s, rep.session_id, rep.src, rep.dst, rep.ok,
                                     bytes_moved=rep.bytes_moved, downtime_ms=rep.downtime_ms,
                                     reason=rep.reason))

    def _migration_failed(self, now_s: float, sid: SessionId, src: WorkerId, dst: WorkerId, reason: str) -> None:
        self.metrics.record_migration(False, 0, 0.0)
        self._emit(MigrationFinished(now_s, sid, src, dst, False, reason=reason))

    # ------------------------------------------------------------------ rounds
    def _begin(self, w: _SimWorker, now_s: float) -> None:
        rnd = w.engine.begin_round(now_s)
        if rnd is None:
            return
        w.rnd = rnd
        if self.cruise_enabled and self._try_cruise(w, rnd):
            return
        self.loop.push(rnd.finish_s, (self._round_done, w))

    # ------------------------------------------------------------------ cruise
    def _try_cruise(self, w: _SimWorker, rnd: InFlightRound) -> bool:
        if self.apply_rounds is None:
            return False
        first = self._first_chunk
        starts: frozenset = frozenset()
        if first and not first.isdisjoint(rnd.plan.session_ids):
            starts = frozenset(sid for sid in rnd.plan.session_ids if sid in first)
        cr = cruising.plan_cruise(w.engine, rnd, w.gen + 1, starts)
        if cr is None:
            return False
        if starts:
            first.difference_update(starts)  # their later chunks are intervals
        self._start_cruise(w, cr)
        return True

    def _start_cruise(self, w: _SimWorker, cr: cruising.Cruise) -> None:
        w.gen = cr.gen
        w.cruise = cr
        self._cruising[w.wid] = w
        push = self.loop.push
        t = cr.t0
        for j in range(1, min(len(cr.changing), cr.k) + 1):
            t = t + cr.dur_ms(j) / 1000.0
            push(t, (self._cruise_round, (w, cr.gen, j)))
        push(cr.end_s, (self._cruise_end, (w, cr.gen)))

    def _cruise_round(self, now_s: float, arg: tuple[_SimWorker, int, int]) -> None:
        """Round j of a cruise grew some contexts: the controller hears of it now, as it
        would round by round (its predicted load moved)."""
        w, gen, j = arg
        cr = w.cruise
        if cr is None or cr.gen != gen:
            return
        cr.told = j
        self._emit(RoundCompleted(now_s, w.wid, cr.changing[j - 1], cr.dur_ms(j)))

    def _cruise_end(self, now_s: float, arg: tuple[_SimWorker, int]) -> None:
        w, gen = arg
        if w.cruise is not None and w.cruise.gen == gen:
            self._settle(w, now_s)

    def settle_all(self, now_s: float) -> None:
        """Make every cruising worker exact at now_s (the run ends)."""
        for w in list(self._cruising.values()):
            self._settle(w, now_s)

    def report_worker(self, wid: WorkerId, now_s: float) -> None:
        """Tell the controller of the rounds worker `wid` completed by now_s while cruising,
        as round by round it would know them (placement is about to read its round phase,
        or its load is about to change), and let it cruise on from its last completed
        round: nothing touched it in between, so that is the cruise its next round would
        plan (a command that does touch it settles it again, the normal way)."""
        w = self._cruising.get(wid)
        if w is not None:
            self._settle(w, now_s, recruise=True)

    def read_phase(self, wid: WorkerId, now_s: float) -> None:
        """Placement is about to read worker `wid`'s round phase: bring it to what
        round-by-round reporting would give at now_s. Once a cruise's growth rounds are all
        told, its later rounds change nothing the controller holds but the phase, so only
        the phase moves (O(1), and the worker cruises on untouched); otherwise its rounds
        are reported (`report_worker`)."""
        w = self._cruising.get(wid)
        if w is None:
            return
        cr = w.cruise
        c, tc = cr.seen
        if not tc <= now_s < cr.next_s:  # no round completed since the last read: as it was
            c, tc = cr.completed_by(now_s)
        if c <= cr.told:
            return  # the controller heard of round c at its own time
        if self.note_phase is not None and cr.told >= min(len(cr.changing), cr.k):
            self.note_phase(wid, tc)
        else:
            self._settle(w, now_s, recruise=True)

    @property
    def cruising(self) -> int:
        return len(self._cruising)

    def _settle(self, w: _SimWorker, now_s: float, recruise: bool = False) -> None:
        cr = w.cruise
        if cr is None:
            return
        c, tc = cr.completed_by(now_s)
        if recruise and c == 0:
            return  # nothing completed since the controller last heard: cruise on as is
        w.cruise = None
        self._cruising.pop(w.wid, None)
        rnd = cr.rnd
        if c == 0:
            # round 1 is still in flight: it finishes the normal way
            self._first_chunk.update(s for s in cr.starts if s in w.engine)
            self.loop.push(rnd.finish_s, (self._round_done, w))
            return
        plan = rnd.plan
        n = len(plan.session_ids)
        # round 1 from its own due times, rounds 2..c each one duration after the last
        metrics = self.metrics
        self._record_latencies(rnd.finish_s, plan.session_ids, rnd.due_s, cr.starts)
        nd = len(cr.durs_ms)
        for j in range(2, min(c, nd) + 1):
            metrics.record_chunks(cr.durs_ms[j - 1], n)
            metrics.record_intervals(cr.durs_ms[j - 1], n)
        sat_rounds = c - max(1, nd)
        if sat_rounds > 0:
            metrics.record_chunks(cr.sat_ms, n * sat_rounds)
            metrics.record_intervals(cr.sat_ms, n * sat_rounds)
        # A round completing exactly now: round-by-round, whatever happens now lands
        # before the next round is formed, so leave its sessions due (flush begins it).
        begin_next = tc < now_s
        w.rnd = cruising.advance(w.engine, cr, c, tc, begin_next)
        self.rounds += c
        self.cruised_rounds += c
        for count, sids in cruising.untold(cr, c).items():
            self.apply_rounds(w.wid, tuple(sids), tc, count)
        if w.rnd is not None:
            nxt = cr.shifted(c, w.rnd, w.gen + 1) if recruise else None
            if nxt is not None:
                self._start_cruise(w, nxt)
            else:
                self.loop.push(w.rnd.finish_s, (self._round_done, w))
        else:
            self._touch(w)

    def _round_done(self, now_s: float, w: _SimWorker) -> None:
        rnd = w.rnd
        w.rnd = None
        if rnd is None or w.released:
            return
        out = w.engine.finish_round(rnd, now_s)
        self.rounds += 1
        self._record(out)
        if self.on_outcome is not None:
            self.on_outcome(out)
        emit = self._emit
        if out.session_ids:
            emit(RoundCompleted(now_s, w.wid, out.session_ids, out.duration_ms))
        for sid in out.became_idle:
            self._first_chunk.discard(sid)
            emit(SessionPaused(now_s, sid))
            self.on_idle(now_s, sid)
        for sid, why in out.failed.items():
            self._where.pop(sid, None)
            emit(SessionFailed(now_s, sid, why, w.wid))
        if w.waiting_stop:
            waiting, w.waiting_stop = w.waiting_stop, []
            for sid in waiting:
                mig = self._migrations.get(sid)
                if mig is None:
                    continue
                if mig[0].ready_to_stop():
                    self._stop_and_copy(now_s, sid)
                else:
                    w.waiting_stop.append(sid)
        self._touch(w)

    def _record(self, out: RoundOutcome) -> None:
        """Chunk latencies and delivery intervals of one round, one append per distinct
        value (a steady round has one)."""
        if not out.due_s:
            return
        first = self._first_chunk
        starts: frozenset | set = frozenset()
        if first and not first.isdisjoint(out.session_ids):
            starts = first.intersection(out.session_ids)
            first.difference_update(starts)
        self._record_latencies(out.finished_s, out.session_ids, out.due_s, starts)

    def _record_latencies(self, finished_s: float, sids: tuple[SessionId, ...], dues: tuple[float, ...],
                          starts: frozenset | set) -> None:
        """One round's chunks, delivered at `finished_s`, each due at its `dues` entry; those
        of `starts` begin an active period, so they end no delivery interval."""
        metrics = self.metrics
        n = len(dues)
        d0 = dues[0]
        if n == 1 or (min(dues) == d0 == max(dues)):
            lat = (finished_s - d0) * 1000.0
            metrics.record_chunks(lat, n)
            metrics.record_intervals(lat, n - len(starts))
            return
        for sid, d in zip(sids, dues):
            lat = (finished_s - d) * 1000.0
            metrics.record_chunks(lat, 1)
            if sid not in starts:
                metrics.record_intervals(lat, 1)

    # ------------------------------------------------------------------ end of run
    def record_unfinished(self, end_s: float, only_over_ms: float | None = None) -> int:
        """Chunks due (or in flight) but undelivered at the end: counted with their wait
        (only those waiting longer than `only_over_ms`, when given)."""
        self.settle_all(end_s)
        n = 0
        waits: list[float] = []
        for w in self.workers.values():
            in_flight = set()
            if w.rnd is not None:
                for sid, due in zip(w.rnd.plan.session_ids, w.rnd.due_s):
                    in_flight.add(sid)
                    waits.append((end_s - due) * 1000.0)
            for entry in w.engine.table.entries():
                if entry.active and entry.due_since_s is not None and entry.session_id not in in_flight:
                    waits.append((end_s - entry.due_since_s) * 1000.0)
        for ms in waits:
            if only_over_ms is None or ms > only_over_ms:
                self.metrics.record_unfinished(ms)
                n += 1
        return n
