"""ClusterState: the controller's incremental record of workers and sessions, and the
source of the `policy.views.ClusterView` that policies read.

In: changes, one call each (a session arrives, is placed, pauses, finishes a round, starts
or ends a migration or an offload; a worker starts, becomes ready, drains, is released or
lost). Out: `view(now_s)`: read-only mappings over frozen `SessionView` and `WorkerView`
records, one record replaced per change. Round completions (the hot path: millions in a
simulated hour) only mark their sessions' records stale; a stale record is rebuilt when
read (through the view or `session`), so every record read is exact and policies pay only
for those they read. No call does O(#sessions) work:
a worker's `groups` and `load_ms` are updated with `GroupLoad` arithmetic and
`policy.load.cycle_ms` over that worker's groups only.

Meaning of the fields (what policies may rely on):
- worker `sessions`: resident sessions (active and idle) plus incoming migrations;
  `used_bytes`: their state bytes plus reservations for incoming migrations; `groups` /
  `load_ms`: the *active* resident sessions only (a migrating session counts on its
  source until the migration commits; a session woken while its offload is under way
  does not count: it becomes pending when the offload ends).
- session `state_bytes`: its state at the full attention window (what placement must
  find room for); `context_frames`: `model.context_after(shape, chunks_done)`.
- `pending`: sessions that must run and have no GPU (new, resuming from host memory, or
  rebuilt after their worker was lost), in the order they became pending.
- `idle_resident`: idle sessions holding GPU memory and not already being offloaded or
  migrated -> idle since (s), oldest first.
- `idle_offloaded`: CompatKey -> idle sessions whose state is in host memory -> offloaded
  since (s), oldest first (what a policy may bring back to a GPU before they resume).
- `slo_groups`: (CompatKey, SLO ms) -> live sessions (changed only by arrivals and removals).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Iterable

from ..config import TurboConfig
from ..policy.latency import LatencyModel
from ..policy.load import GroupLoad, cycle_ms
from ..policy.views import ClusterView, SessionView, WorkerView, spec_slo_ms
from ..types import CompatKey, SessionId, SessionSpec, WorkerId, WorkerState
from .records import PhaseMap, SessionEntry, SessionViews, WorkerEntry, session_view, worker_view


class StateError(ValueError):
    """A change that does not apply to the current state; the message says why."""


class ClusterState:
    def __init__(self, model: LatencyModel, config: TurboConfig) -> None:
        self.model = model
        self.config = config
        self.max_batch = config.engine.max_batch
        self._s: dict[SessionId, SessionEntry] = {}
        self._w: dict[WorkerId, WorkerEntry] = {}
        self._sviews: dict[SessionId, SessionView] = {}
        # sessions whose SessionView lags their record (round completions): rebuilt when read
        self._stale: set[SessionId] = set()
        self._wviews: dict[WorkerId, WorkerView] = {}
        self._pending: dict[SessionId, None] = {}
        self._pending_tuple: tuple[SessionId, ...] | None = ()
        self._idle: dict[SessionId, float] = {}
        self._sessions_ro = SessionViews(self._sviews, self._stale, self._s)
        self._workers_ro = MappingProxyType(self._wviews)
        self._idle_ro = MappingProxyType(self._idle)
        self._idle_off: dict[CompatKey, dict[SessionId, float]] = {}
        self._idle_off_ro = MappingProxyType(self._idle_off)
        self._slo_groups: dict[tuple[CompatKey, float], int] = {}
        self._slo_groups_ro = MappingProxyType(self._slo_groups)
        self._ctx_table: dict[str, list[float]] = {}  # shape -> context after n chunks, to saturation
        self._bytes_by_shape: dict[str, int] = {}
        self.demand_history: tuple[tuple[float, float], ...] = ()
        self._phase_hook = None
        # worker -> (latest round completion (s), predicted ms of the round that began then)
        self._last_round: dict[WorkerId, tuple[float, float]] = {}
        self._last_round_ro = PhaseMap(self._last_round)

    def set_phase_hook(self, hook, before_read=None) -> None:  # noqa: ANN001 - Callable[[WorkerId], None] | None
        """`hook(wid)` runs before a worker's load changes and, unless `before_read` is
        given, before its round phase is read, so that a simulator running that worker's
        rounds in bulk can report them first (the phase recorded then uses the load the
        rounds ran with). `before_read(wid)`: what runs before a read instead. None: no hook."""
        self._phase_hook = hook
        self._last_round_ro.before_read = before_read if before_read is not None else hook

    def note_round_completion(self, wid: WorkerId, now_s: float) -> None:
        """Worker `wid` completed a round at `now_s` that changed nothing the controller
        holds (no context grew, no period ended): only its round phase moves, to the entry
        `round_completed` would record. For a simulator's phase reads of bulk-run rounds."""
        if wid in self._w:
            self._last_round[wid] = (now_s, self._wviews[wid].load_ms)

    # ------------------------------------------------------------------- reading
    def view(self, now_s: float) -> ClusterView:
        """O(1): the mappings are live read-only views, valid during one policy call (until
        the next change)."""
        if self._pending_tuple is None:
            self._pending_tuple = tuple(self._pending)
        return ClusterView(now_s, self._workers_ro, self._sessions_ro, self._pending_tuple, self.model,
                           self.config, self._idle_ro, self.demand_history, self._last_round_ro,
                           self._idle_off_ro, self._slo_groups_ro)

    def has_session(self, sid: SessionId) -> bool:
        return sid in self._s

    def has_worker(self, wid: WorkerId) -> bool:
        return wid in self._w

    def session(self, sid: SessionId) -> SessionView:
        return self._sessions_ro[sid]

    def worker(self, wid: WorkerId) -> WorkerView:
        return self._wviews[wid]

    def worker_ids(self) -> Iterable[WorkerId]:
        return self._w.keys()

    def session_ids(self) -> Iterable[SessionId]:
        return self._s.keys()

    def chunks_wanted(self, sid: SessionId) -> int:
        """What the session's current active period still owes (0 = unbounded)."""
        return self._sess(sid).chunks_wanted

    def is_active(self, sid: SessionId) -> bool:
        return self._sess(sid).active

    def is_offloading(self, sid: SessionId) -> bool:
        return self._sess(sid).offloading

    def placed_ever(self, sid: SessionId) -> bool:
        return self._sess(sid).placed_ever

    def prompt(self, sid: SessionId) -> str:
        return self._sess(sid).prompt

    def sessions_on(self, wid: WorkerId) -> frozenset[SessionId]:
        return self._wk(wid).frozen

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------- workers
    def add_worker(self, wid: WorkerId, now_s: float, memory_bytes: int, *, ready: bool = False) -> None:
        if wid in self._w:
            raise StateError(f"worker {wid!r} already exists")
        w = WorkerEntry(wid, WorkerState.READY if ready else WorkerState.STARTING, memory_bytes, now_s)
        self._w[wid] = w
        self._wrefresh(w)

    def set_worker_state(self, wid: WorkerId, state: WorkerState, now_s: float) -> None:
        """READY (worker came up, or a release was cancelled) or DRAINING."""
        w = self._wk(wid)
        if state is WorkerState.READY and w.ready_s is None:
            w.ready_s = now_s
        w.state = state
        self._wrefresh(w)

    def remove_worker(self, wid: WorkerId) -> None:
        """A released worker: it must hold nothing."""
        w = self._wk(wid)
        if w.sessions:
            raise StateError(f"worker {wid!r} still holds sessions {sorted(w.sessions)}")
        del self._w[wid]
        del self._wviews[wid]
        self._last_round.pop(wid, None)

    def lose_worker(self, wid: WorkerId, now_s: float) -> tuple[list[SessionId], list[SessionId]]:
        """The worker failed. Its resident sessions lose their GPU state: active ones go
        back to pending (rebuilt from checkpoints), idle ones become offloaded. Migrations
        into it are cancelled (the session stays on its source). Returns
        (sessions that lost their state, sessions whose incoming migration was cancelled)."""
        w = self._wk(wid)
        lost: list[SessionId] = []
        cancelled: list[SessionId] = []
        for sid in sorted(w.sessions):
            s = self._s[sid]
            if s.migrating_to == wid:
                s.migrating_to = None
                cancelled.append(sid)
                if not s.active and not s.offloading and s.worker is not None:
                    self._idle[sid] = s.last_change_s
                self._srefresh(s)
                continue
            if s.migrating_to is not None:  # outgoing: release the destination's reservation
                d = self._w.get(s.migrating_to)
                s.migrating_to = None
                if d is not None:
                    self._detach_incoming(d, s)
            s.worker = None
            s.offloading = False
            self._idle.pop(sid, None)
            if s.active:
                self._add_pending(s, now_s)
            s.last_change_s = now_s
            self._srefresh(s)
            lost.append(sid)
        del self._w[wid]
        del self._wviews[wid]
        self._last_round.pop(wid, None)
        return lost, cancelled

    # ------------------------------------------------------------------ sessions
    def add_session(self, sid: SessionId, spec: SessionSpec, prompt: str, now_s: float,
                    chunks_wanted: int = 0) -> None:
        """A new session: pending, active for `chunks_wanted` chunks (0 = until paused)."""
        if sid in self._s:
            raise StateError(f"session {sid!r} already exists")
        if chunks_wanted < 0:
            raise StateError(f"chunks_wanted must be >= 0, got {chunks_wanted}")
        nbytes = self._full_bytes(spec.model)  # raises for a shape the model lacks
        s = SessionEntry(sid, spec, prompt, now_s, nbytes)
        s.unbounded = chunks_wanted == 0
        s.left = chunks_wanted
        self._s[sid] = s
        g = s.slo_group = (s.key, spec_slo_ms(self.config, spec))
        self._slo_groups[g] = self._slo_groups.get(g, 0) + 1
        self._add_pending(s, now_s)
        self._srefresh(s)

    def place(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        """A pending session goes to a worker (check `fits` first)."""
        s = self._sess(sid)
        if not s.pending:
            raise StateError(f"session {sid!r} is not pending (it is {s.state.value})")
        w = self._wk(wid)
        s.pending = False
        self._pending.pop(sid, None)
        self._pending_tuple = None
        self._put(s, w, now_s)

    def prefetch(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        """An idle session in host memory goes back to a GPU before it resumes (check `fits`
        first). It is idle resident from now on."""
        s = self._sess(sid)
        if s.active or s.pending or s.worker is not None or not s.placed_ever:
            raise StateError(f"session {sid!r} is not idle in host memory (it is {s.state.value})")
        w = self._wk(wid)
        self._drop_idle_off(s)
        self._put(s, w, now_s)
        self._idle[sid] = now_s

    def _put(self, s: SessionEntry, w: WorkerEntry, now_s: float) -> None:
        s.worker = w.id
        s.placed_ever = True
        s.last_change_s = now_s
        w.sessions.add(s.id)
        w.frozen = frozenset(w.sessions)
        w.used_bytes += s.state_bytes
        if s.active:
            self._group_add(w, s)
        self._wrefresh(w)
        self._srefresh(s)

    def pending_since(self, sid: SessionId) -> float:
        """When the session started waiting for a GPU: its chunk has been due since then."""
        return self._s[sid].pending_since_s

    def fits(self, sid: SessionId, wid: WorkerId) -> bool:
        w = self._w.get(wid)
        s = self._s.get(sid)
        return w is not None and s is not None and w.used_bytes + s.state_bytes <= w.memory_bytes

    def activate(self, sid: SessionId, now_s: float, chunks_wanted: int = 0) -> str:
        """The user wants chunks again. Returns what the controller must do: 'engine' (tell
        the resident worker), 'pending' (queued for placement), 'later' (offload or
        migration in progress: the engine side is handled when it ends) or 'none'."""
        s = self._sess(sid)
        s.unbounded = chunks_wanted == 0
        s.left = chunks_wanted
        if s.active:
            self._srefresh(s)
            return "engine" if s.worker is not None and not s.offloading else "none"
        s.active = True
        s.last_change_s = now_s
        self._idle.pop(sid, None)
        self._drop_idle_off(s)
        if s.worker is not None:
            if s.offloading:
                self._srefresh(s)
                return "later"
            w = self._w[s.worker]
            self._group_add(w, s)
            self._wrefresh(w)
            self._srefresh(s)
            return "engine"
        self._add_pending(s, now_s)
        self._srefresh(s)
        return "pending"

    def pause(self, sid: SessionId, now_s: float) -> str:
        """The session owes nothing now. Returns 'engine' (tell its worker), or 'none'."""
        s = self._sess(sid)
        if not s.active:
            return "none"
        s.active = False
        s.unbounded = True
        s.left = 0
        s.last_change_s = now_s
        if s.pending:  # never got a GPU this period: nothing resident to pause
            s.pending = False
            self._pending.pop(sid, None)
            self._pending_tuple = None
            if s.placed_ever:  # its state stayed in host memory
                self._idle_off.setdefault(s.key, {})[sid] = now_s
            self._srefresh(s)
            return "none"
        if s.worker is None:
            self._srefresh(s)
            return "none"
        if not s.offloading:  # an offloading session is not in its worker's load
            w = self._w[s.worker]
            self._group_remove(w, s)
            self._wrefresh(w)
        if not s.offloading and s.migrating_to is None:
            self._idle[sid] = now_s
        self._srefresh(s)
        return "engine"

    def round_completed(self, wid: WorkerId, sids: Iterable[SessionId], now_s: float,
                        rounds: int = 1) -> bool:
        """The listed sessions each got `rounds` chunks on `wid`. Updates their chunk counts,
        contexts and period bookkeeping (a period whose chunks are all delivered makes the
        session idle, as the engine does). Returns whether the worker's view changed.
        Their `SessionView`s are rebuilt when next read."""
        w = self._w.get(wid)
        changed = False
        get = self._s.get
        stale = self._stale
        ctx_tables = self._ctx_table
        groups = w.groups if w is not None else None
        for sid in sids:
            s = get(sid)
            if s is None:
                continue
            done = s.chunks_done = s.chunks_done + rounds
            if s.saturated:  # context at the window already: it stays
                new_ctx = s.context
            else:
                table = ctx_tables.get(s.spec.model)
                if table is None:
                    table = ctx_tables[s.spec.model] = self._context_table(s.spec.model)
                if done < len(table):
                    new_ctx = table[done]
                else:
                    new_ctx = table[-1]
                    s.saturated = True
            if new_ctx != s.context:
                if s.active and groups is not None and s.worker == wid and not s.offloading:
                    g = groups[s.key]
                    groups[s.key] = GroupLoad(g.key, g.batch, max(0.0, g.context_sum + new_ctx - s.context))
                    changed = True
                s.context = new_ctx
            if s.active and not s.unbounded:
                s.left -= rounds
                if s.left <= 0:  # the engine ended the period by itself
                    self.pause(sid, now_s)
                    changed = True
                    continue
            stale.add(sid)
        if changed and w is not None:
            self._wrefresh(w, recompute=True)
        if w is not None:  # the next round starts now, with the sessions active now
            self._last_round[wid] = (now_s, self._wviews[wid].load_ms)
        return changed

    def begin_migration(self, sid: SessionId, dst: WorkerId, now_s: float) -> None:
        s = self._sess(sid)
        if s.worker is None or s.migrating_to is not None or s.offloading:
            raise StateError(f"session {sid!r} cannot migrate now (it is {s.state.value})")
        if dst == s.worker:
            raise StateError(f"session {sid!r} is already on {dst!r}")
        d = self._wk(dst)
        s.migrating_to = dst
        s.last_change_s = now_s
        self._idle.pop(sid, None)
        d.sessions.add(sid)
        d.frozen = frozenset(d.sessions)
        d.used_bytes += s.state_bytes
        self._wrefresh(d)
        self._srefresh(s)

    def end_migration(self, sid: SessionId, ok: bool, now_s: float) -> bool:
        """Commit (ok) or cancel the session's migration. Returns False if none was under way."""
        s = self._s.get(sid)
        if s is None or s.migrating_to is None:
            return False
        dst = self._w.get(s.migrating_to)
        src = self._w.get(s.worker) if s.worker is not None else None
        s.migrating_to = None
        if ok and dst is not None:
            if src is not None:
                src.sessions.discard(sid)
                src.frozen = frozenset(src.sessions)
                src.used_bytes -= s.state_bytes
                if s.active:
                    self._group_remove(src, s)
                self._wrefresh(src, recompute=s.active)
            s.worker = dst.id
            s.last_migrated_s = now_s
            if s.active:
                self._group_add(dst, s)
            self._wrefresh(dst, recompute=s.active)
        elif dst is not None:
            self._detach_incoming(dst, s)
        if not s.active and s.worker is not None:
            self._idle[sid] = s.last_change_s
        s.last_change_s = now_s
        self._srefresh(s)
        return True

    def begin_offload(self, sid: SessionId, now_s: float) -> None:
        s = self._sess(sid)
        if s.worker is None or s.active or s.migrating_to is not None or s.offloading:
            raise StateError(f"session {sid!r} cannot be offloaded now (it is {s.state.value}); "
                             "only idle resident sessions can")
        s.offloading = True
        self._idle.pop(sid, None)
        self._srefresh(s)

    def end_offload(self, sid: SessionId, now_s: float) -> bool:
        """The state reached host memory; the GPU memory is free. An active session (woken
        during the offload) becomes pending. Returns False if no offload was under way."""
        s = self._s.get(sid)
        if s is None or not s.offloading:
            return False
        s.offloading = False
        w = self._w.get(s.worker) if s.worker is not None else None
        if w is not None:
            w.sessions.discard(sid)
            w.frozen = frozenset(w.sessions)
            w.used_bytes -= s.state_bytes  # (an active one was never put back in the load)
            self._wrefresh(w, recompute=False)
        s.worker = None
        s.last_change_s = now_s
        if s.active:
            self._add_pending(s, now_s)
        else:
            self._idle_off.setdefault(s.key, {})[sid] = now_s
        self._srefresh(s)
        return True

    def remove_session(self, sid: SessionId) -> tuple[WorkerId | None, WorkerId | None]:
        """The session ended. Returns (resident worker, migration destination) it held."""
        s = self._s.pop(sid, None)
        if s is None:
            return None, None
        del self._sviews[sid]
        self._stale.discard(sid)
        self._idle.pop(sid, None)
        self._drop_idle_off(s)
        n = self._slo_groups[s.slo_group] - 1
        if n:
            self._slo_groups[s.slo_group] = n
        else:
            del self._slo_groups[s.slo_group]
        if s.pending:
            self._pending.pop(sid, None)
            self._pending_tuple = None
        dst_id = s.migrating_to
        if dst_id is not None and dst_id in self._w:
            self._detach_incoming(self._w[dst_id], s)
        if s.worker is not None and s.worker in self._w:
            w = self._w[s.worker]
            w.sessions.discard(sid)
            w.frozen = frozenset(w.sessions)
            w.used_bytes -= s.state_bytes
            counted = s.active and not s.offloading
            if counted:
                self._group_remove(w, s)
            self._wrefresh(w, recompute=counted)
        return s.worker, dst_id

    # ---------------------------------------------------------------- internals
    def _sess(self, sid: SessionId) -> SessionEntry:
        try:
            return self._s[sid]
        except KeyError:
            raise StateError(f"unknown session {sid!r}") from None

    def _wk(self, wid: WorkerId) -> WorkerEntry:
        try:
            return self._w[wid]
        except KeyError:
            raise StateError(f"unknown worker {wid!r}") from None

    def _drop_idle_off(self, s: SessionEntry) -> None:
        group = self._idle_off.get(s.key)
        if group is not None and group.pop(s.id, None) is not None and not group:
            del self._idle_off[s.key]

    def _add_pending(self, s: SessionEntry, now_s: float) -> None:
        if not s.pending:
            s.pending_since_s = now_s
        s.pending = True
        self._pending[s.id] = None
        self._pending_tuple = None

    def _detach_incoming(self, d: WorkerEntry, s: SessionEntry) -> None:
        d.sessions.discard(s.id)
        d.frozen = frozenset(d.sessions)
        d.used_bytes -= s.state_bytes
        self._wrefresh(d)

    def _group_add(self, w: WorkerEntry, s: SessionEntry) -> None:
        if self._phase_hook is not None:
            self._phase_hook(w.id)
        g = w.groups.get(s.key)
        w.groups[s.key] = g.plus(s.context) if g is not None else GroupLoad(s.key, 1, s.context)

    def _group_remove(self, w: WorkerEntry, s: SessionEntry) -> None:
        if self._phase_hook is not None:
            self._phase_hook(w.id)
        g = w.groups[s.key].minus(s.context)
        if g.batch <= 0:
            del w.groups[s.key]
        else:
            w.groups[s.key] = g

    def _wrefresh(self, w: WorkerEntry, recompute: bool = True) -> None:
        if recompute:
            w.load_ms = cycle_ms(w.groups.values(), self.model, self.max_batch) if w.groups else 0.0
        self._wviews[w.id] = worker_view(w)

    def _srefresh(self, s: SessionEntry) -> None:
        self._sviews[s.id] = session_view(s)
        self._stale.discard(s.id)

    def _context_table(self, shape: str) -> list[float]:
        """Context after 0, 1, ... chunks until it reaches the window (then it stays)."""
        window = float(self.model.shape(shape).window_frames)
        table = [float(self.model.context_after(shape, 0))]
        while table[-1] < window and len(table) < 100_000:
            table.append(float(self.model.context_after(shape, len(table))))
        return table

    def _full_bytes(self, shape: str) -> int:
        nbytes = self._bytes_by_shape.get(shape)
        if nbytes is None:
            try:
                info = self.model.shape(shape)
            except (KeyError, ValueError, LookupError) as e:
                raise StateError(f"the latency model has no shape {shape!r}: {e}") from None
            nbytes = self._bytes_by_shape[shape] = int(self.model.state_bytes(shape, info.window_frames))
        return nbytes
