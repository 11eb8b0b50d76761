"""The engine's per-session bookkeeping: one mutable `SessionEntry` per resident session.

In: sessions added, imported, activated, paused, removed by `EngineCore`.
Out: for each session its spec, prompt, next chunk index, cached context, whether it is
active, how many chunks its current active period still owes, which memory tier holds
its state, and since when its next chunk is due. Entries are mutable and private to one
engine; everything that leaves the engine is a frozen copy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterator

from ..types import CompatKey, SessionId, SessionSpec


class Tier(str, enum.Enum):
    """Where a session's state lives on this engine."""

    GPU = "gpu"  # on the device: the session can run
    HOST = "host"  # offloaded to host memory: must be restored before it runs
    MIGRATING = "migrating"  # held at a chunk boundary while its state is copied away


class SessionError(KeyError):
    """An engine call named a session the engine does not hold, or one in the wrong tier."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "session error"


@dataclass(slots=True)
class SessionEntry:
    session_id: SessionId
    spec: SessionSpec
    key: CompatKey
    prompt: str
    chunk_index: int = 0  # index of the next chunk to generate (= chunks delivered so far)
    context_frames: int = 0  # latent frames in the session's cache now
    active: bool = False  # owed chunks (the user has not paused it)
    unbounded: bool = True  # chunks_wanted was 0: generate until paused or closed
    chunks_remaining: int = 0  # chunks still owed in this active period (if not unbounded)
    tier: Tier = Tier.GPU
    state_bytes: int = 0  # bytes the state takes in its tier
    due_since_s: float | None = None  # when the next chunk became due; None = not due
    in_flight: bool = False  # a round generating its next chunk has begun and not finished
    held: bool = False  # frozen at a chunk boundary (stop-and-copy of a migration)

    @property
    def runnable(self) -> bool:
        """Its next chunk may be scheduled: active, on the GPU, not held, not in flight."""
        return self.active and self.tier is Tier.GPU and not self.held and not self.in_flight


class SessionTable:
    """sid -> SessionEntry, with errors that name the missing session."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[SessionId, SessionEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sid: object) -> bool:
        return sid in self._entries

    def __iter__(self) -> Iterator[SessionId]:
        return iter(self._entries)

    def entries(self) -> Iterator[SessionEntry]:
        return iter(self._entries.values())

    def get(self, sid: SessionId) -> SessionEntry:
        try:
            return self._entries[sid]
        except KeyError:
            raise SessionError(f"session {sid!r} is not on this engine") from None

    def find(self, sid: SessionId) -> SessionEntry | None:
        return self._entries.get(sid)

    def add(self, entry: SessionEntry) -> None:
        if entry.session_id in self._entries:
            raise SessionError(f"session {entry.session_id!r} is already on this engine")
        self._entries[entry.session_id] = entry

    def pop(self, sid: SessionId) -> SessionEntry:
        entry = self.get(sid)
        del self._entries[sid]
        return entry
