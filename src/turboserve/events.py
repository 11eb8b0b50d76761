"""Typed events of the closed loop.

In: things that happen (a session arrives, a round completes, a GPU becomes ready).
Out: frozen records that the controller consumes, whether they come from the simulator's
event heap or from live workers and the HTTP API. Every event carries `time_s`: seconds on
the clock that drives the run (simulated or `time.monotonic()`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .types import SessionId, SessionSpec, WorkerId


@dataclass(frozen=True)
class Event:
    time_s: float


@dataclass(frozen=True)
class SessionArrived(Event):
    session_id: SessionId
    spec: SessionSpec
    prompt: str = ""
    chunks_wanted: int = 0  # chunks owed in the first active period; 0 = until paused/closed


@dataclass(frozen=True)
class SessionActivated(Event):
    """An idle (or offloaded) session wants chunks again."""

    session_id: SessionId
    chunks_wanted: int = 0  # 0 = until paused/closed


@dataclass(frozen=True)
class SessionPaused(Event):
    session_id: SessionId


@dataclass(frozen=True)
class SessionDeparted(Event):
    session_id: SessionId


@dataclass(frozen=True)
class SessionFailed(Event):
    """A session ended by an error on its worker (a failed chunk, a placement or restore
    that could not be done); other sessions are unaffected."""

    session_id: SessionId
    reason: str = ""
    worker_id: WorkerId | None = None


@dataclass(frozen=True)
class RoundCompleted(Event):
    """A worker finished one coalesced round; these sessions each got one chunk."""

    worker_id: WorkerId
    session_ids: tuple[SessionId, ...]
    duration_ms: float
    # chunks each listed session got: > 1 when a simulator reports several identical
    # back-to-back rounds as one event (duration_ms is then that of one round)
    rounds: int = 1


@dataclass(frozen=True)
class WorkerReady(Event):
    worker_id: WorkerId


@dataclass(frozen=True)
class WorkerLost(Event):
    worker_id: WorkerId


@dataclass(frozen=True)
class MigrationFinished(Event):
    session_id: SessionId
    src: WorkerId
    dst: WorkerId
    ok: bool
    bytes_moved: int = 0
    downtime_ms: float = 0.0
    reason: str = ""  # why it aborted, when ok is False


@dataclass(frozen=True)
class OffloadFinished(Event):
    session_id: SessionId
    worker_id: WorkerId
    bytes_moved: int = 0


@dataclass(frozen=True)
class RestoreFinished(Event):
    session_id: SessionId
    worker_id: WorkerId
    bytes_moved: int = 0


@dataclass(frozen=True)
class Tick(Event):
    """Periodic wake-up: autoscaling hold timers, offload grace periods, polling baselines."""

    meta: dict = field(default_factory=dict, compare=False)
