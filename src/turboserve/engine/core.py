"""EngineCore: one device's sessions, memory and coalesced rounds (plan -> execute -> update).

In: session commands (add, import, activate, pause, remove, set_prompt, offload, restore,
export, hold for migration) with the time they happen, and calls to run rounds.
Out: `RoundOutcome`s: the chunks delivered (session, chunk index, due time, latency,
frames), the sessions whose active period just ended (idle by themselves), the sessions
that failed; `TransferResult`s of offloads and restores; `SessionBlob`s of exported
sessions; an `EngineSnapshot` for the scheduler.

Per-chunk latency (DESIGN.md): a chunk is due when its session is active and its previous
chunk was delivered, or when the session became active or was placed here; latency =
delivery time - due time. A round takes one compatibility group (the one whose oldest due
chunk has waited longest) and all its due sessions up to `max_batch`. Every due chunk is
delivered exactly once and in order; an executor error for one session fails that session
only. The engine never reads a clock itself: callers pass `now_s` (simulated or monotonic),
so the simulator and the live server run this same code. It never blocks on I/O: the
executor does the work, and its transfers are its own business.

Used from one thread at a time (the live transport serialises calls per engine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..events import RoundCompleted
from ..policy.latency import LatencyModel
from ..policy.load import GroupLoad
from ..types import CompatKey, SessionId, SessionSpec, WorkerId
from .batch_former import BatchFormer
from .executor import ChunkOutput, Executor, RoundPlan, RoundResult, SessionBlob, TransferResult
from .session_table import SessionEntry, SessionError, SessionTable, Tier
from .state_pool import PoolFullError, StatePool

__all__ = [
    "Delivery", "EngineCore", "EngineSnapshot", "InFlightRound", "PoolFullError", "RoundOutcome",
    "SessionError", "SessionInfo", "Tier",
]


@dataclass(frozen=True, slots=True)
class Delivery:
    session_id: SessionId
    chunk_index: int
    due_s: float  # when the chunk became due
    latency_ms: float  # delivery time - due time
    frames: Any = None  # uint8 (T, H, W, 3) or None where the executor makes no pixels


@dataclass(slots=True)
class InFlightRound:
    """A round whose work has been issued (executor called) but whose chunks are not yet
    delivered: the simulator delivers them at `started_s + duration_ms`, the live loop at
    once."""

    plan: RoundPlan
    result: RoundResult
    started_s: float
    due_s: tuple[float, ...]  # per planned session, when its chunk became due

    @property
    def duration_ms(self) -> float:
        return self.result.duration_ms

    @property
    def finish_s(self) -> float:
        """Planned delivery time on a simulated clock."""
        return self.started_s + self.result.duration_ms / 1000.0


class RoundOutcome:
    """What one finished round did. Built for speed (the simulator makes millions): the
    per-chunk records are parallel tuples; `deliveries` builds `Delivery` objects on demand."""

    __slots__ = ("worker_id", "key", "started_s", "finished_s", "duration_ms", "session_ids",
                 "chunk_indices", "due_s", "frames", "became_idle", "failed")

    def __init__(self, worker_id: WorkerId, key: CompatKey, started_s: float, finished_s: float,
                 duration_ms: float, session_ids: tuple[SessionId, ...],
                 chunk_indices: tuple[int, ...], due_s: tuple[float, ...],
                 frames: tuple[Any, ...] | None, became_idle: list[SessionId],
                 failed: dict[SessionId, str]) -> None:
        self.worker_id = worker_id
        self.key = key
        self.started_s = started_s
        self.finished_s = finished_s  # delivery time of every chunk of the round
        self.duration_ms = duration_ms
        self.session_ids = session_ids  # sessions that got a chunk, in plan order
        self.chunk_indices = chunk_indices  # the chunk each of them got
        self.due_s = due_s  # when each of those chunks became due
        self.frames = frames  # per delivered chunk, or None when the executor makes none
        self.became_idle = became_idle  # active period complete: idle now, owed nothing
        self.failed = failed  # sid -> error; these sessions were removed from the engine

    @property
    def deliveries(self) -> list[Delivery]:
        fin = self.finished_s
        frames = self.frames or (None,) * len(self.session_ids)
        return [Delivery(sid, idx, due, (fin - due) * 1000.0, fr)
                for sid, idx, due, fr in zip(self.session_ids, self.chunk_indices, self.due_s, frames)]

    def latencies_ms(self) -> list[float]:
        fin = self.finished_s
        return [(fin - due) * 1000.0 for due in self.due_s]

    def to_event(self) -> RoundCompleted:
        """The controller's view of this round: which sessions each got one chunk."""
        return RoundCompleted(time_s=self.finished_s, worker_id=self.worker_id,
                              session_ids=self.session_ids, duration_ms=self.duration_ms)

    def __repr__(self) -> str:
        return (f"RoundOutcome(worker={self.worker_id!r}, chunks={len(self.session_ids)}, "
                f"duration_ms={self.duration_ms:.3f}, idle={self.became_idle}, failed={self.failed})")


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A frozen copy of one session's engine entry."""

    session_id: SessionId
    spec: SessionSpec
    prompt: str
    chunk_index: int  # next chunk to generate = chunks delivered
    context_frames: int
    active: bool
    chunks_wanted: int  # chunks still owed in this active period; 0 = unbounded (or idle)
    tier: Tier
    state_bytes: int
    due_since_s: float | None
    in_flight: bool
    held: bool


@dataclass(frozen=True)
class EngineSnapshot:
    worker_id: WorkerId
    groups: tuple[GroupLoad, ...]  # active GPU-resident sessions per CompatKey (sorted by key)
    used_bytes: int  # GPU bytes held by sessions plus reservations
    capacity_bytes: int
    host_bytes: int  # offloaded state kept for this engine's sessions
    resident: tuple[SessionId, ...]  # sessions whose state is on the GPU tier here
    offloaded: tuple[SessionId, ...]  # sessions whose state is on the host tier here
    due: int  # chunks due now and not yet running


class EngineCore:
    def __init__(self, worker_id: WorkerId, executor: Executor, *, memory_bytes: int,
                 max_batch: int = 32, model: LatencyModel | None = None) -> None:
        self.worker_id = worker_id
        self.executor = executor
        self.max_batch = max_batch
        # the model only tells how context grows per chunk; the profiled executor carries one
        self.model = model if model is not None else getattr(executor, "model", None)
        self.table = SessionTable()
        self.pool = StatePool(memory_bytes)
        self.former = BatchFormer(max_batch)
        self.rounds_done = 0
        self._ctx_fn: dict[str, Callable[[int], int]] = {}
        self._state_grows = bool(getattr(executor, "state_grows", False))

    # ---------------------------------------------------------------- session commands
    def add_session(self, sid: SessionId, spec: SessionSpec, prompt: str, now_s: float, *,
                    active: bool = True, chunks_wanted: int = 0,
                    due_since_s: float | None = None) -> int:
        """Create a new session here; returns its state bytes. Raises `PoolFullError`
        (nothing changed) when it does not fit, ValueError on a bad argument.
        `due_since_s` backdates its first chunk's due time (default `now_s`)."""
        if sid in self.table:
            raise SessionError(f"session {sid!r} is already on engine {self.worker_id!r}")
        _check_wanted(chunks_wanted)
        estimate = getattr(self.executor, "estimate_bytes", None)
        if estimate is not None:
            self.pool.require(sid, estimate(spec))
        nbytes = self.executor.add_session(sid, spec, prompt)
        try:
            self.pool.allocate(sid, nbytes)
        except PoolFullError:
            self.executor.remove_session(sid)
            raise
        entry = SessionEntry(sid, spec, spec.compat_key, prompt, state_bytes=nbytes)
        entry.context_frames = self._context(entry)
        self.table.add(entry)
        if active:
            self._start_period(entry, chunks_wanted, now_s if due_since_s is None else due_since_s)
        return nbytes

    def import_session(self, blob: SessionBlob, now_s: float, *, active: bool,
                       chunks_wanted: int = 0, due_since_s: float | None = None) -> int:
        """Take in a session exported by another engine (migration), using the memory
        reserved for it if any; it continues at `blob.chunk_index`. Returns its bytes."""
        sid = blob.session_id
        if sid in self.table:
            raise SessionError(f"session {sid!r} is already on engine {self.worker_id!r}")
        _check_wanted(chunks_wanted)
        self.pool.require(sid, blob.nbytes)
        nbytes = self.executor.import_state(blob)
        try:
            self.pool.allocate(sid, nbytes)
        except PoolFullError:
            self.executor.remove_session(sid)
            raise
        entry = SessionEntry(sid, blob.spec, blob.spec.compat_key, blob.prompt,
                             chunk_index=blob.chunk_index, state_bytes=nbytes)
        entry.context_frames = self._context(entry)
        self.table.add(entry)
        if active:
            self._start_period(entry, chunks_wanted, now_s if due_since_s is None else due_since_s)
        return nbytes

    def activate(self, sid: SessionId, now_s: float, chunks_wanted: int = 0, *,
                 due_since_s: float | None = None) -> None:
        """The session wants chunks again (a new active period of `chunks_wanted` chunks;
        0 = until paused). On an active session this only resets what the period owes.
        `due_since_s` backdates the first chunk's due time (the session waited for a GPU)."""
        _check_wanted(chunks_wanted)
        entry = self.table.get(sid)
        if entry.active:
            entry.unbounded = chunks_wanted == 0
            entry.chunks_remaining = chunks_wanted
            return
        self._start_period(entry, chunks_wanted, now_s if due_since_s is None else min(due_since_s, now_s))

    def pause(self, sid: SessionId, now_s: float) -> None:
        """The session owes nothing until activated again; idempotent. A chunk already in
        flight is still delivered."""
        entry = self.table.get(sid)
        entry.active = False
        entry.unbounded = True
        entry.chunks_remaining = 0
        entry.due_since_s = None
        self.former.unmark(sid)

    def remove(self, sid: SessionId) -> None:
        """Drop the session and its state (closed, failed or migrated away). A chunk of it
        in flight is discarded when its round finishes."""
        self.table.pop(sid)
        self.former.unmark(sid)
        self.pool.free(sid)
        self.executor.remove_session(sid)

    def set_prompt(self, sid: SessionId, prompt: str) -> None:
        """Takes effect from the next chunk planned."""
        entry = self.table.get(sid)
        self.executor.set_prompt(sid, prompt)
        entry.prompt = prompt

    def reserve(self, sid: SessionId, nbytes: int) -> None:
        """Promise GPU memory to an incoming migration; raises `PoolFullError` if it lacks."""
        self.pool.reserve(sid, nbytes)

    def cancel_reservation(self, sid: SessionId) -> int:
        return self.pool.cancel_reservation(sid)

    # ----------------------------------------------------------------- memory tiers
    def offload(self, sid: SessionId) -> TransferResult:
        """Move the session's state to the host tier; it stops being scheduled (an active
        session keeps its due time and resumes on `restore`). Refused while its chunk is in
        flight (offload at a chunk boundary)."""
        entry = self.table.get(sid)
        if entry.tier is not Tier.GPU:
            raise SessionError(f"session {sid!r} is not on the GPU tier of {self.worker_id!r} "
                               f"(it is {entry.tier.value})")
        if entry.in_flight:
            raise SessionError(f"session {sid!r} has a chunk in flight; offload it after the round")
        result = self.executor.offload(sid)
        self.pool.to_host(sid)
        entry.tier = Tier.HOST
        self.former.unmark(sid)
        return result

    def restore(self, sid: SessionId, now_s: float | None = None) -> TransferResult:
        """Bring an offloaded session back to the GPU tier. Raises `PoolFullError` (nothing
        changed) if it does not fit. An active session is due again from its old due time,
        or from `now_s` if it had none."""
        entry = self.table.get(sid)
        if entry.tier is not Tier.HOST:
            raise SessionError(f"session {sid!r} is not offloaded on {self.worker_id!r}")
        self.pool.require(sid, entry.state_bytes)
        result = self.executor.restore(sid)
        self.pool.to_gpu(sid)
        entry.tier = Tier.GPU
        if entry.active:
            if entry.due_since_s is None:
                if now_s is None:
                    raise ValueError(f"restoring active session {sid!r} needs now_s")
                entry.due_since_s = now_s
            self._mark_if_runnable(entry)
        return result

    # -------------------------------------------------------------------- migration
    def hold(self, sid: SessionId) -> None:
        """Stop scheduling the session (stop-and-copy of a migration). If its chunk is in
        flight, the hold takes effect at the chunk boundary when the round finishes; its
        next chunk's due time keeps running, so migration downtime shows in its latency."""
        entry = self.table.get(sid)
        entry.held = True
        self.former.unmark(sid)

    def unhold(self, sid: SessionId, now_s: float) -> None:
        """Undo `hold` (an aborted migration): the session runs here again."""
        entry = self.table.get(sid)
        entry.held = False
        if entry.active and entry.due_since_s is None and not entry.in_flight:
            entry.due_since_s = now_s
        self._mark_if_runnable(entry)

    def at_chunk_boundary(self, sid: SessionId) -> bool:
        """No chunk of the session is being generated: its state may be exported."""
        return not self.table.get(sid).in_flight

    def export(self, sid: SessionId, *, keep: bool = False) -> SessionBlob:
        """The session's whole state for another engine. Removes it here unless `keep`
        (a migration exports with keep=True while held and removes on commit, so an abort
        leaves it intact). Refused while its chunk is in flight."""
        entry = self.table.get(sid)
        if entry.in_flight:
            raise SessionError(f"session {sid!r} has a chunk in flight; export it at a chunk boundary")
        blob = self.executor.export_state(sid)
        if blob.chunk_index != entry.chunk_index:
            raise RuntimeError(f"executor exported session {sid!r} at chunk {blob.chunk_index}, "
                               f"the engine is at chunk {entry.chunk_index}")
        if not keep:
            self.remove(sid)
        return blob

    def info(self, sid: SessionId) -> SessionInfo:
        e = self.table.get(sid)
        return SessionInfo(e.session_id, e.spec, e.prompt, e.chunk_index, e.context_frames, e.active,
                           0 if (e.unbounded or not e.active) else e.chunks_remaining, e.tier,
                           e.state_bytes, e.due_since_s, e.in_flight, e.held)

    def __contains__(self, sid: object) -> bool:
        return sid in self.table

    # ------------------------------------------------------------------------ rounds
    def has_due_work(self) -> bool:
        return len(self.former) > 0

    def oldest_due_s(self) -> float | None:
        return self.former.oldest_due_s()

    def begin_round(self, now_s: float) -> InFlightRound | None:
        """Plan the next coalesced round and hand it to the executor. Its chunks are
        delivered by `finish_round`. None when nothing is due."""
        batch = self.former.take_batch()
        if batch is None:
            return None
        key, sids, dues = batch
        get = self.table.get
        entries = [get(sid) for sid in sids]
        for e in entries:
            e.in_flight = True
        plan = RoundPlan(self.worker_id, key, tuple(sids), tuple(e.chunk_index for e in entries),
                         tuple(e.context_frames for e in entries))
        result = self._execute(plan)
        return InFlightRound(plan, result, now_s, tuple(dues))

    def finish_round(self, rnd: InFlightRound, now_s: float) -> RoundOutcome:
        """Deliver the round's chunks at `now_s` and update every session it touched."""
        plan, result = rnd.plan, rnd.result
        errors = result.errors
        outputs = result.outputs
        plan_sids = plan.session_ids
        # Outputs in plan order, one per session and no errors (the usual case) are matched
        # by position; anything else goes through a lookup by session.
        in_order = not errors and len(outputs) == len(plan_sids)
        by_sid: dict[SessionId, ChunkOutput] | None = None
        find = self.table.find
        ctx = self._ctx_fn_for(plan.key.model)
        sids: list[SessionId] = []
        idxs: list[int] = []
        dues: list[float] = []
        frames: list[Any] = []
        any_frames = False
        became_idle: list[SessionId] = []
        failed: dict[SessionId, str] = {}
        again: list[SessionId] = []  # due again from now_s, in plan order
        gpu = Tier.GPU
        for i, sid in enumerate(plan_sids):
            idx = plan.chunk_indices[i]
            entry = find(sid)
            if entry is None or not entry.in_flight:
                continue  # removed (closed) during the round: its chunk is dropped
            entry.in_flight = False
            out = outputs[i] if in_order else None
            if out is None or out.session_id != sid:
                if by_sid is None:
                    by_sid = {o.session_id: o for o in outputs}
                out = by_sid.get(sid)
            if out is None or out.chunk_index != idx or sid in errors:
                why = errors.get(sid) or (
                    "the executor returned no chunk" if out is None
                    else f"the executor returned chunk {out.chunk_index}, expected {idx}")
                failed[sid] = why
                self._drop_failed(sid)
                continue
            sids.append(sid)
            idxs.append(idx)
            dues.append(rnd.due_s[i])
            fr = out.frames
            if fr is not None:
                any_frames = True
            frames.append(fr)
            entry.chunk_index = idx + 1
            entry.context_frames = ctx(idx + 1)
            entry.due_since_s = None
            if not entry.active:
                continue  # paused during the round
            if not entry.unbounded:
                entry.chunks_remaining -= 1
                if entry.chunks_remaining <= 0:
                    entry.active = False
                    entry.unbounded = True
                    entry.chunks_remaining = 0
                    became_idle.append(sid)
                    continue
            entry.due_since_s = now_s
            if not entry.held and entry.tier is gpu:
                again.append(sid)
        if again:
            self.former.mark_due_many(plan.key, again, now_s)
        if self._state_grows:
            self._rebook(sids)
        self.rounds_done += 1
        return RoundOutcome(self.worker_id, plan.key, rnd.started_s, now_s, result.duration_ms,
                            tuple(sids), tuple(idxs), tuple(dues),
                            tuple(frames) if any_frames else None, became_idle, failed)

    def _rebook(self, sids: list[SessionId]) -> None:
        """Book what each session's state takes now: its caches grew on the device during the
        round, so the pool follows even past capacity (and then admits nothing more)."""
        for sid in sids:
            entry = self.table.find(sid)
            if entry is None or entry.tier is not Tier.GPU:
                continue
            nbytes = self.executor.state_bytes(sid)
            if nbytes != entry.state_bytes:
                self.pool.resize(sid, nbytes, force=True)
                entry.state_bytes = nbytes

    def step(self, clock: Callable[[], float]) -> RoundOutcome | None:
        """The live loop's body: run one round now and deliver it when the work is done.
        Returns None when nothing is due (the caller waits for a command)."""
        rnd = self.begin_round(clock())
        if rnd is None:
            return None
        return self.finish_round(rnd, clock())

    # ---------------------------------------------------------------------- snapshot
    def snapshot(self) -> EngineSnapshot:
        """O(sessions here): for reports and checks, not for the per-event path."""
        groups: dict[CompatKey, GroupLoad] = {}
        resident: list[SessionId] = []
        offloaded: list[SessionId] = []
        for e in self.table.entries():
            if e.tier is Tier.HOST:
                offloaded.append(e.session_id)
                continue
            resident.append(e.session_id)
            if e.active:
                g = groups.get(e.key) or GroupLoad(e.key, 0, 0.0)
                groups[e.key] = g.plus(float(e.context_frames))
        return EngineSnapshot(self.worker_id, tuple(groups[k] for k in sorted(groups)),
                              self.pool.used_bytes, self.pool.capacity_bytes, self.pool.host_bytes,
                              tuple(resident), tuple(offloaded), len(self.former))

    # ---------------------------------------------------------------------- internals
    def _start_period(self, entry: SessionEntry, chunks_wanted: int, due_s: float) -> None:
        entry.active = True
        entry.unbounded = chunks_wanted == 0
        entry.chunks_remaining = chunks_wanted
        if not entry.in_flight:  # else it becomes due when its chunk in flight is delivered
            entry.due_since_s = due_s
            self._mark_if_runnable(entry)

    def _mark_if_runnable(self, entry: SessionEntry) -> None:
        if entry.runnable and entry.due_since_s is not None and entry.session_id not in self.former:
            self.former.mark_due(entry.session_id, entry.key, entry.due_since_s)

    def _context(self, entry: SessionEntry) -> int:
        fn = self._ctx_fn.get(entry.spec.model)
        if fn is None:
            fn = self._ctx_fn[entry.spec.model] = self._make_ctx_fn(entry.spec)
        return fn(entry.chunk_index)

    def _ctx_fn_for(self, shape: str) -> Callable[[int], int]:
        """Context after n chunks for a shape whose sessions are here (all of a round's
        sessions share one CompatKey, hence one shape)."""
        fn = self._ctx_fn.get(shape)
        if fn is None:  # made when the first session of the shape was added
            raise SessionError(f"no session of model {shape!r} was ever added to {self.worker_id!r}")
        return fn

    def _make_ctx_fn(self, spec: SessionSpec) -> Callable[[int], int]:
        model, name = self.model, spec.model
        if model is not None:
            try:
                model.shape(name)
            except (KeyError, ValueError, LookupError):
                model = None
        if model is not None:
            cache: dict[int, int] = {}

            def ctx(chunks: int) -> int:
                v = cache.get(chunks)
                if v is None:
                    v = cache[chunks] = int(model.context_after(name, chunks))
                return v
            return ctx
        per_chunk = spec.frames_per_chunk  # no profile: one latent frame per video frame
        return lambda chunks: chunks * per_chunk

    def _execute(self, plan: RoundPlan) -> RoundResult:
        try:
            return self.executor.execute(plan)
        except Exception as batch_error:  # noqa: BLE001 - isolate the culprit below
            if len(plan.session_ids) == 1:
                return RoundResult(plan, (), 0.0, {plan.session_ids[0]: _describe(batch_error)})
        # The whole batch raised: run each session alone so only the failing ones fail.
        outputs: list[ChunkOutput] = []
        errors: dict[SessionId, str] = {}
        total_ms = 0.0
        for i, sid in enumerate(plan.session_ids):
            single = RoundPlan(plan.worker_id, plan.key, (sid,), (plan.chunk_indices[i],),
                               (plan.context_frames[i],))
            try:
                res = self.executor.execute(single)
            except Exception as e:  # noqa: BLE001
                errors[sid] = _describe(e)
                continue
            outputs.extend(res.outputs)
            errors.update(res.errors)
            total_ms += res.duration_ms
        return RoundResult(plan, tuple(outputs), total_ms, errors)

    def _drop_failed(self, sid: SessionId) -> None:
        try:
            self.remove(sid)
        except Exception:  # noqa: BLE001 - a broken session must not take the engine down
            # the executor could not drop it; forget it here all the same
            if sid in self.table:
                self.table.pop(sid)
            self.pool.free(sid)
            self.former.unmark(sid)


def _check_wanted(chunks_wanted: int) -> None:
    if chunks_wanted < 0:
        raise ValueError(f"chunks_wanted must be >= 0 (0 = until paused), got {chunks_wanted}")


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
