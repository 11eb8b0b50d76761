"""Snapshots that policies read, and the decision they return.

In (to a policy): a `ClusterView` with flat `WorkerView`s and `SessionView`s, the latency
model and the config, plus the policy's own `memory` from its previous call.
Out: a `Decision` (placements, migrations, offloads, scale-out/release) carrying the new
memory. A policy is a pure function of (view, memory): no clock reads, no I/O, so the same
code runs live and in the simulator.

The controller keeps these views incrementally (one frozen record replaced per change), so
building a `ClusterView` is O(1); the mappings are read-only and valid during one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from ..config import TurboConfig
from ..types import CompatKey, SessionId, SessionSpec, SessionState, WorkerId, WorkerState
from .latency import LatencyModel
from .load import GroupLoad


@dataclass(frozen=True)
class SessionView:
    id: SessionId
    spec: SessionSpec
    state: SessionState
    worker: WorkerId | None  # resident worker (None when queued or offloaded)
    context_frames: float  # latent frames in its cache now
    state_bytes: int  # GPU bytes its state takes (or would take on restore)
    arrival_s: float
    last_change_s: float  # when `state` last changed (idle since, active since, ...)
    last_migrated_s: float = float("-inf")
    chunks_done: int = 0

    @property
    def active(self) -> bool:
        return self.state is SessionState.ACTIVE


@dataclass(frozen=True)
class WorkerView:
    id: WorkerId
    state: WorkerState
    memory_bytes: int  # bytes available for session state (GPU memory less weights)
    used_bytes: int  # session state resident now, plus reservations for incoming sessions
    sessions: frozenset[SessionId]  # resident sessions (active and idle), incoming included
    groups: tuple[GroupLoad, ...]  # load of its active sessions, one entry per CompatKey
    load_ms: float  # predicted cycle time: the per-chunk latency its active sessions see
    started_s: float  # provisioned (billing starts)
    ready_s: float | None = None  # None while starting

    @property
    def free_bytes(self) -> int:
        return self.memory_bytes - self.used_bytes

    @property
    def accepting(self) -> bool:
        return self.state is WorkerState.READY


@dataclass(frozen=True)
class ClusterView:
    now_s: float
    workers: Mapping[WorkerId, WorkerView]  # provisioned workers (starting, ready, draining)
    sessions: Mapping[SessionId, SessionView]  # every live session
    pending: tuple[SessionId, ...]  # must run and have no GPU: new or resuming from host
    model: LatencyModel
    config: TurboConfig
    # idle sessions still holding GPU memory -> idle since (s), oldest first (insertion order)
    idle_resident: Mapping[SessionId, float] = field(default_factory=dict)
    demand_history: tuple[tuple[float, float], ...] = ()  # (time_s, demand in GPUs) samples
    # worker -> (when its latest round was reported complete (s), predicted duration (ms)
    # of the round that began then, with the sessions active then); rounds run back to back
    # while work is due, later ones at the worker's `load_ms`: this is the worker's phase
    last_round: Mapping[WorkerId, tuple[float, float]] = field(default_factory=dict)
    # CompatKey -> idle sessions whose state is in host memory -> offloaded since (s),
    # oldest first (insertion order)
    idle_offloaded: Mapping[CompatKey, Mapping[SessionId, float]] = field(default_factory=dict)
    # (CompatKey, SLO ms) -> live sessions with both: the few kinds of session present, so
    # that a policy can settle a question per kind rather than per session. None: not kept
    slo_groups: Mapping[tuple[CompatKey, float], int] | None = None

    def slo_ms(self, spec: SessionSpec) -> float:
        return spec_slo_ms(self.config, spec)


def spec_slo_ms(config: TurboConfig, spec: SessionSpec) -> float:
    """A session's per-chunk latency target: `slo.slo_ms`, or else its chunk's playback time."""
    return config.slo.slo_ms or 1000.0 * spec.chunk_seconds


@dataclass(frozen=True)
class Placement:
    session_id: SessionId
    worker_id: WorkerId


@dataclass(frozen=True)
class Migration:
    session_id: SessionId
    src: WorkerId
    dst: WorkerId
    predicted_gain_ms: float = 0.0


@dataclass(frozen=True)
class Decision:
    placements: tuple[Placement, ...] = ()
    migrations: tuple[Migration, ...] = ()
    offloads: tuple[SessionId, ...] = ()  # idle sessions whose state goes to host memory
    # idle sessions in host memory whose state goes back to a GPU before they resume
    prefetches: tuple[Placement, ...] = ()
    scale_out: int = 0  # workers to start now
    release: tuple[WorkerId, ...] = ()  # workers to drain; released once they hold nothing
    cancel_release: tuple[WorkerId, ...] = ()  # draining workers to put back in service
    memory: Any = None  # the policy's state, handed back on its next call
    notes: tuple[str, ...] = field(default=(), compare=False)  # why, for logs and debugging

    @property
    def empty(self) -> bool:
        return not (self.placements or self.migrations or self.offloads or self.prefetches
                    or self.scale_out or self.release or self.cancel_release)


class Policy(Protocol):
    name: str
    # Whether `decide` reads `ClusterView.last_round` (round phases). A simulator keeps
    # phases exact before placements only for policies that do (it costs time); absent
    # means True.
    reads_round_phase: bool

    def initial_gpus(self, config: TurboConfig) -> int:
        """Workers provisioned (and ready) at time 0."""
        ...

    def initial_memory(self) -> Any: ...

    def decide(self, view: ClusterView, memory: Any) -> Decision: ...
