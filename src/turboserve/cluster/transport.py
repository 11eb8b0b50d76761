"""The Transport protocol: how the controller's decisions reach engines, and how their
completions come back.

In (from the controller): commands with the time they are issued. Out (to the controller):
events through the `emit` callback bound with `bind`, for what finishes later or happens by
itself: `WorkerReady`, `RoundCompleted`, `MigrationFinished`, `OffloadFinished`,
`RestoreFinished`, `WorkerLost`, and `SessionPaused` when an engine finished a session's
active period (it became idle by itself).

Engines live behind a transport: the simulator's `SimTransport` (discrete events with
modelled durations), the live `LocalTransport` (engine threads), `InProcessTransport`
(engines in a dict, effects immediate; tests and a base class).

Contract every implementation keeps:
- Commands never raise for a session or worker that vanished in the meantime (a race
  between an event and a decision); they emit the failure instead (e.g. a
  `MigrationFinished(ok=False, reason=...)`) or ignore a command that no longer applies.
- `emit` may be called from inside a command (the controller queues re-entrant events).
- `place(..., from_host=True)` brings a session whose state is off-GPU (offloaded on some
  worker, or only a checkpoint after its worker was lost) onto `wid`, continuing at its
  chunk index; `from_host=False` creates a new session. `activate`, `pause`, `offload` and
  `close` sent while that state is still on its way apply once it lands (`LandingCommands`).
- `migrate` runs `engine.migration.Migration` (pre-copy, stop-and-copy at a chunk
  boundary, commit) and emits `MigrationFinished` with bytes and downtime.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, runtime_checkable

from ..events import Event
from ..types import SessionId, SessionSpec, WorkerId

EmitFn = Callable[[Event], None]


@runtime_checkable
class Transport(Protocol):
    def bind(self, emit: EmitFn) -> None:
        """Where to send events; the controller binds itself when it is built."""
        ...

    def start_worker(self, wid: WorkerId, now_s: float, *, memory_bytes: int,
                     ready: bool = False) -> None:
        """Provision a worker with `memory_bytes` for session state; emit `WorkerReady`
        when it can take sessions (at once when `ready`, e.g. at bootstrap)."""
        ...

    def release_worker(self, wid: WorkerId, now_s: float) -> None:
        """Stop (and stop paying for) a worker that holds no session."""
        ...

    def place(self, sid: SessionId, spec: SessionSpec, prompt: str, wid: WorkerId, now_s: float, *,
              from_host: bool, active: bool, chunks_wanted: int,
              due_since_s: float | None = None) -> None:
        """Put a session on a worker (new, or restored from host memory / checkpoint).
        `due_since_s`: since when its first chunk has been due (it waited for a GPU); that
        wait counts in the chunk's latency. None = now."""
        ...

    def migrate(self, sid: SessionId, src: WorkerId, dst: WorkerId, now_s: float) -> None:
        """Move a resident session live; emits `MigrationFinished` (ok or the abort reason)."""
        ...

    def offload(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        """Move an idle session's state to host memory; emits `OffloadFinished`."""
        ...

    def activate(self, sid: SessionId, wid: WorkerId, now_s: float, chunks_wanted: int) -> None:
        """A resident session wants chunks again (0 = until paused)."""
        ...

    def pause(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        """A resident session owes nothing until activated."""
        ...

    def close(self, sid: SessionId, wid: WorkerId | None, now_s: float) -> None:
        """End a session and free its state wherever it is (`wid` None: not resident)."""
        ...


class LandingCommands:
    """Commands for sessions whose state is being copied onto a worker asynchronously.

    A transport calls `expect(sid)` before it starts such a copy, `landed(sid)` once the
    state is on the worker (it gets the commands to run there now, in order) or `dropped(sid)`
    if the copy failed. Meanwhile `defer(sid, command)` keeps a command instead of sending it
    to a worker that does not hold the session yet (it would be lost). Thread-safe: the
    landing and the commands come from different threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[SessionId, list[Callable[..., Any]]] = {}

    def expect(self, sid: SessionId) -> None:
        with self._lock:
            self._waiting.setdefault(sid, [])

    def defer(self, sid: SessionId, command: Callable[..., Any]) -> bool:
        """Keep `command` if `sid` is on its way; False = send it now."""
        with self._lock:
            waiting = self._waiting.get(sid)
            if waiting is None:
                return False
            waiting.append(command)
            return True

    def landed(self, sid: SessionId) -> list[Callable[..., Any]]:
        with self._lock:
            return self._waiting.pop(sid, [])

    def dropped(self, sid: SessionId) -> None:
        with self._lock:
            self._waiting.pop(sid, None)
