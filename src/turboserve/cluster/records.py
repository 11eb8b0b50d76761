"""The records behind `ClusterState`, and the read-only mappings its views hand out.

In: nothing of its own: `ClusterState` creates and changes the mutable `SessionEntry` and
`WorkerEntry` records. Out: `session_view` / `worker_view` (the frozen `SessionView` /
`WorkerView` of a record, built field by field without the dataclass `__init__`),
`SessionViews` (sid -> view, rebuilding stale records when read) and `PhaseMap` (worker ->
its latest round completion, with a hook that runs before each read).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Mapping

from ..policy.load import GroupLoad
from ..policy.views import SessionView, WorkerView
from ..types import CompatKey, SessionId, SessionSpec, SessionState, WorkerId, WorkerState


class SessionEntry:
    """The controller's mutable record of one live session."""

    __slots__ = ("id", "spec", "key", "prompt", "arrival_s", "active", "unbounded", "left",
                 "worker", "pending", "migrating_to", "offloading", "placed_ever", "chunks_done",
                 "context", "saturated", "state_bytes", "last_change_s", "last_migrated_s",
                 "pending_since_s", "slo_group")

    def __init__(self, sid: SessionId, spec: SessionSpec, prompt: str, now_s: float,
                 state_bytes: int) -> None:
        self.id = sid
        self.spec = spec
        self.key = spec.compat_key
        self.prompt = prompt
        self.arrival_s = now_s
        self.active = True  # the user wants chunks
        self.unbounded = True  # this active period runs until paused
        self.left = 0  # chunks this active period still owes (when not unbounded)
        self.worker: WorkerId | None = None  # resident on (GPU state there)
        self.pending = False
        self.migrating_to: WorkerId | None = None
        self.offloading = False
        self.placed_ever = False
        self.chunks_done = 0
        self.context = 0.0
        self.saturated = False  # chunks_done is past the end of its shape's context table
        self.state_bytes = state_bytes
        self.last_change_s = now_s
        self.last_migrated_s = float("-inf")
        self.pending_since_s = now_s  # when it last started waiting for a GPU
        self.slo_group: tuple[CompatKey, float] = (self.key, 0.0)  # its key in `slo_groups`

    @property
    def state(self) -> SessionState:
        if self.migrating_to is not None:
            return SessionState.MIGRATING
        if self.worker is not None:
            return SessionState.ACTIVE if self.active else SessionState.IDLE
        return SessionState.QUEUED if self.pending else SessionState.OFFLOADED

    @property
    def chunks_wanted(self) -> int:
        """What a (re)placement must ask the engine for: 0 = unbounded."""
        return 0 if self.unbounded else max(1, self.left)


class WorkerEntry:
    """The controller's mutable record of one worker; `groups` / `load_ms` count its
    active resident sessions only."""

    __slots__ = ("id", "state", "memory_bytes", "used_bytes", "sessions", "frozen", "groups",
                 "load_ms", "started_s", "ready_s")

    def __init__(self, wid: WorkerId, state: WorkerState, memory_bytes: int, now_s: float) -> None:
        self.id = wid
        self.state = state
        self.memory_bytes = memory_bytes
        self.used_bytes = 0
        self.sessions: set[SessionId] = set()
        self.frozen: frozenset[SessionId] = frozenset()
        self.groups: dict[CompatKey, GroupLoad] = {}
        self.load_ms = 0.0
        self.started_s = now_s
        self.ready_s: float | None = now_s if state is WorkerState.READY else None


class PhaseMap(Mapping):
    """worker -> (latest round completion (s), predicted ms of the round begun then),
    read-only. `before_read`, when set, runs before a worker's entry is read: a simulator
    that runs rounds in bulk brings that worker's entry up to date there (reporting its
    completed rounds, or `ClusterState.note_round_completion`), so the entry is the one
    round-by-round reporting would hold."""

    __slots__ = ("_d", "before_read")

    def __init__(self, d: dict[WorkerId, tuple[float, float]]) -> None:
        self._d = d
        self.before_read = None

    def __getitem__(self, wid: WorkerId) -> tuple[float, float]:
        if self.before_read is not None:
            self.before_read(wid)
        return self._d[wid]

    def get(self, wid: WorkerId, default=None):  # noqa: ANN001 - placement reads it per candidate
        if self.before_read is not None:
            self.before_read(wid)
        return self._d.get(wid, default)

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self):
        return iter(self._d)


class SessionViews(Mapping):
    """sid -> SessionView, read-only. Records whose sessions completed rounds are marked
    stale and rebuilt when read, so a policy pays only for the sessions it looks at."""

    __slots__ = ("_views", "_stale", "_records")

    def __init__(self, views: dict[SessionId, SessionView], stale: set[SessionId],
                 records: dict[SessionId, "SessionEntry"]) -> None:
        self._views = views
        self._stale = stale
        self._records = records

    def __getitem__(self, sid: SessionId) -> SessionView:
        if sid in self._stale:
            return self._rebuild(sid)
        return self._views[sid]

    def get(self, sid: SessionId, default=None):  # noqa: ANN001 - Mapping.get's signature
        if sid in self._stale:
            return self._rebuild(sid)
        return self._views.get(sid, default)

    def __contains__(self, sid: object) -> bool:
        return sid in self._views

    def __len__(self) -> int:
        return len(self._views)

    def __iter__(self):  # noqa: ANN204
        return iter(self._views)

    def _rebuild(self, sid: SessionId) -> SessionView:
        self._stale.discard(sid)
        v = self._views[sid] = session_view(self._records[sid])
        return v

    def __repr__(self) -> str:
        return f"SessionViews({len(self._views)} sessions)"


_new_object = object.__new__
_set_attr = object.__setattr__
# the fast builders below set exactly these fields: a field added to a view must be added there
_BUILT_FIELDS = {
    SessionView: ("id", "spec", "state", "worker", "context_frames", "state_bytes", "arrival_s",
                  "last_change_s", "last_migrated_s", "chunks_done"),
    WorkerView: ("id", "state", "memory_bytes", "used_bytes", "sessions", "groups", "load_ms",
                 "started_s", "ready_s"),
}
for _cls, _names in _BUILT_FIELDS.items():
    if tuple(f.name for f in fields(_cls)) != _names:
        raise ImportError(f"cluster/records.py builds {_cls.__name__} field by field; its fields are now "
                          f"{[f.name for f in fields(_cls)]}: update session_view / worker_view")


def session_view(s: SessionEntry) -> SessionView:
    """`SessionView(...)` of the record, built without the frozen dataclass's per-field
    `__init__` (a third of the cost; the result is equal field by field)."""
    v = _new_object(SessionView)
    _set_attr(v, "__dict__", {
        "id": s.id, "spec": s.spec, "state": s.state, "worker": s.worker, "context_frames": s.context,
        "state_bytes": s.state_bytes, "arrival_s": s.arrival_s, "last_change_s": s.last_change_s,
        "last_migrated_s": s.last_migrated_s, "chunks_done": s.chunks_done})
    return v


def worker_view(w: WorkerEntry) -> WorkerView:
    """`WorkerView(...)` of the record, built the same way as `session_view`."""
    v = _new_object(WorkerView)
    _set_attr(v, "__dict__", {
        "id": w.id, "state": w.state, "memory_bytes": w.memory_bytes, "used_bytes": w.used_bytes,
        "sessions": w.frozen, "groups": tuple(w.groups.values()), "load_ms": w.load_ms,
        "started_s": w.started_s, "ready_s": w.ready_s})
    return v
