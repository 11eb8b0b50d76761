"""The executor interface: the one seam between engine bookkeeping and real or modelled work.

In: a `RoundPlan` (which sessions of one compatibility group get their next chunk) and
per-session commands (add, remove, offload, restore, export, import, checkpoint, rebuild).
Out: `RoundResult`s with the frames and the round's duration, and `TransferResult`s.

Two implementations share everything above this line: `ProfiledExecutor` takes durations
from the latency model and emits synthetic frames (simulator and tests), `TorchExecutor`
runs a `ChunkGenerator` on a device. Durations are measured by the torch one and modelled
by the profiled one; callers never care which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from ..types import CompatKey, SessionId, SessionSpec, WorkerId


@dataclass(frozen=True)
class RoundPlan:
    worker_id: WorkerId
    key: CompatKey
    session_ids: tuple[SessionId, ...]
    chunk_indices: tuple[int, ...]  # index of the chunk each session gets this round
    context_frames: tuple[int, ...]  # each session's cached latent frames before this round


@dataclass(frozen=True)
class ChunkOutput:
    session_id: SessionId
    chunk_index: int
    frames: Any = None  # numpy uint8 (T, H, W, 3); None where the executor makes no pixels


@dataclass(frozen=True)
class RoundResult:
    plan: RoundPlan
    outputs: tuple[ChunkOutput, ...]
    duration_ms: float  # measured (torch) or modelled (profiled)
    errors: Mapping[SessionId, str] = field(default_factory=dict)  # failed sessions only


@dataclass(frozen=True)
class TransferResult:
    session_id: SessionId
    nbytes: int
    duration_ms: float


@dataclass
class SessionBlob:
    """A session's whole state in transit between engines (migration)."""

    session_id: SessionId
    spec: SessionSpec
    prompt: str
    chunk_index: int
    nbytes: int
    payload: Any = None  # executor-specific: a StreamState for torch, None for profiled


class Executor(Protocol):
    def add_session(self, session_id: SessionId, spec: SessionSpec, prompt: str) -> int:
        """Create the session's state on the device; returns its bytes."""
        ...

    def remove_session(self, session_id: SessionId) -> None: ...

    def set_prompt(self, session_id: SessionId, prompt: str) -> None: ...

    def state_bytes(self, session_id: SessionId) -> int:
        """The state's bytes now. An executor whose states grow as the cache fills says so
        with a class attribute `state_grows = True`; the engine then re-books each session's
        bytes after every round it runs (the profiled executor books the full window at once)."""
        ...

    def execute(self, plan: RoundPlan) -> RoundResult: ...

    def offload(self, session_id: SessionId) -> TransferResult:
        """Move the state to the host tier (pinned memory on CUDA)."""
        ...

    def restore(self, session_id: SessionId) -> TransferResult: ...

    def export_state(self, session_id: SessionId) -> SessionBlob: ...

    def import_state(self, blob: SessionBlob) -> int: ...

    def checkpoint(self, session_id: SessionId) -> Any: ...

    def rebuild(self, session_id: SessionId, ckpt: Any) -> int: ...
