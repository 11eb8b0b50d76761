"""Identifiers, session specs and lifecycle states shared by every layer.

In: nothing (standard library only). Out: `SessionSpec`, `CompatKey`, the state enums and
the id aliases that policies, engines, the simulator and the server all speak.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field, replace

SessionId = str
WorkerId = str


class SessionState(str, enum.Enum):
    """Where a session is in its life, as the API reports it."""

    QUEUED = "queued"  # admitted, waiting for a GPU (new, or resumed from host memory)
    ACTIVE = "active"  # resident on a worker and owed chunks
    IDLE = "idle"  # resident on a worker, paused by the user, owed nothing
    OFFLOADED = "offloaded"  # idle, state in host memory, holds no GPU memory
    MIGRATING = "migrating"  # state moving between workers
    CLOSED = "closed"  # ended normally
    FAILED = "failed"  # ended by an error; other sessions are unaffected


class WorkerState(str, enum.Enum):
    STARTING = "starting"  # provisioned (billed) but not ready: start-up delay
    READY = "ready"  # accepts sessions
    DRAINING = "draining"  # chosen for release: sessions are migrated off, none placed
    RELEASED = "released"  # gone, no longer billed
    LOST = "lost"  # failed; its sessions are rebuilt elsewhere from checkpoints


@dataclass(frozen=True)
class SessionSpec:
    """What a session asks for. Sessions with equal `compat_key` can share a coalesced round.

    `model` names a *shape* in the simulator (a model at a resolution with a profile, e.g.
    `wan1.3b-480p`) and a *model config* in the engine (e.g. `tiny`); both resolve to the
    same latency profile through `turboserve.profile`.
    """

    model: str = "tiny"
    width: int = 0  # video pixels; 0 = the model's default
    height: int = 0  # video pixels; 0 = the model's default
    fps: float = 16.0  # playback frames per second
    frames_per_chunk: int = 4  # video frames delivered per chunk
    steps: int = 4  # denoising steps per chunk (plus one clean pass that writes the cache)
    seed: int = 0

    @property
    def chunk_seconds(self) -> float:
        """Playback duration of one chunk: the default per-chunk latency target."""
        return self.frames_per_chunk / self.fps

    @functools.cached_property
    def compat_key(self) -> "CompatKey":
        # cached: policies ask for it per session per decision (the spec is frozen); and
        # one object per distinct key, so the dicts keyed by it match on identity
        fields = (self.model, self.width, self.height, self.frames_per_chunk, self.steps)
        key = _COMPAT_KEYS.get(fields)
        if key is None:
            key = _COMPAT_KEYS[fields] = CompatKey(*fields)
        return key

    def with_(self, **changes) -> "SessionSpec":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "frames_per_chunk": self.frames_per_chunk,
            "steps": self.steps,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SessionSpec":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass(frozen=True, order=True)
class CompatKey:
    """Sessions that can be coalesced into one forward: same weights, shapes and step count."""

    model: str
    width: int
    height: int
    frames_per_chunk: int
    steps: int

    def __hash__(self) -> int:
        # policies key dicts by it millions of times per simulated hour: hash once
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.model, self.width, self.height, self.frames_per_chunk, self.steps))
            object.__setattr__(self, "_hash", h)
        return h

    def __eq__(self, other: object) -> bool:
        if self is other:  # SessionSpec.compat_key gives one object per key
            return True
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.model, self.width, self.height, self.frames_per_chunk, self.steps) == \
            (other.model, other.width, other.height, other.frames_per_chunk, other.steps)

    def __getstate__(self) -> dict:
        # string hashes differ between processes: a pickled key hashes afresh where it lands
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}


_COMPAT_KEYS: dict[tuple, CompatKey] = {}  # SessionSpec.compat_key's one object per key


@dataclass(frozen=True)
class Period:
    """One stretch of a session: `active_s` seconds of video wanted, then `idle_s` paused."""

    active_s: float
    idle_s: float = 0.0


@dataclass(frozen=True)
class SessionRecord:
    """One line of a session trace (JSONL): who arrives when, wanting what."""

    id: SessionId
    arrival_s: float
    spec: SessionSpec
    periods: tuple[Period, ...]
    prompt: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def active_seconds(self) -> float:
        return sum(p.active_s for p in self.periods)

    def chunks_in_period(self, i: int) -> int:
        """Chunks owed in period i: enough video to cover its active seconds (at least 1)."""
        import math

        return max(1, math.ceil(self.periods[i].active_s / self.spec.chunk_seconds - 1e-9))
