"""ProfiledExecutor: the Executor whose work is the latency model's prediction.

In: the same calls as the torch executor (`RoundPlan`s, add/remove/offload/restore/export/
import/checkpoint/rebuild). Out: `RoundResult`s whose duration is
`model.round_ms(shape, batch, mean context, steps) + batch * model.fixed_ms(shape)` (the
formula of `policy.load.group_round_ms` for one round), state bytes from
`model.state_bytes` at the shape's full window (what a session will hold at most, so the
engine's memory accounting never has to grow), offload/restore durations over
`config.link("host")`. A profile with `jitter` (profile/format.py) makes each round's
duration that prediction times a ratio drawn from it, or plus a draw in ms where its
`jitter_unit` is "ms" (`seed`: this executor's draws); with
`jitter_shared` too and a `SharedHost`, a round begun while another executor of that host
is mid-round draws from `jitter_shared` instead (engines competing for the same cores).
A round whose batch size has its own table (`jitter_by_batch`, `jitter_shared_by_batch`)
draws from that one.
With `frames=True` each chunk carries a tiny deterministic uint8
frame (1, 8, 8, 3) tagging its session and chunk index, so tests can check order.

The simulator calls `execute` millions of times: no numpy and no per-call allocation
beyond the outputs when `frames=False`; per-shape constants are cached.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import fields
from typing import Any, Callable

from ..config import TurboConfig
from ..policy.latency import LatencyModel, transfer_ms
from ..types import SessionId, SessionSpec
from .executor import ChunkOutput, RoundPlan, RoundResult, SessionBlob, TransferResult


class SharedHost:
    """The executors of one machine: until when (s, on `clock`) each is mid-round."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._busy_until: dict[int, float] = {}  # id(executor) -> end of its round

    def others_busy(self, me: object, now_s: float) -> bool:
        key = id(me)
        return any(until > now_s for k, until in self._busy_until.items() if k != key)

    def mark(self, me: object, until_s: float) -> None:
        self._busy_until[id(me)] = until_s


MIN_ROUND_MS = 0.001  # an added draw below the median never makes a round free


def _draw(rng: random.Random, quantiles: tuple[float, ...]) -> float:
    """Inverse CDF: linear between the quantiles, endpoints included."""
    pos = rng.random() * (len(quantiles) - 1)
    i = int(pos)
    hi = quantiles[i + 1] if i + 1 < len(quantiles) else quantiles[i]
    return quantiles[i] + (hi - quantiles[i]) * (pos - i)


class ProfiledExecutor:
    """Executor protocol over a LatencyModel; `model` is public (the engine reads context
    growth from it)."""

    def __init__(self, model: LatencyModel, config: TurboConfig | None = None, *,
                 frames: bool = False, seed: int = 0, host: SharedHost | None = None) -> None:
        self.model = model
        self._rng = random.Random(seed)
        self.host = host
        # shape -> (jitter, jitter_shared quantiles, whether they are ms added, not ratios,
        #           batch -> jitter, batch -> jitter_shared)
        self._jitter: dict[str, tuple] = {}
        self.config = config if config is not None else TurboConfig()
        self.frames = frames
        host = self.config.link("host")
        self._host_alpha_ms = host.alpha_ms
        self._host_gbps = host.bandwidth_gbps
        # sid -> [spec, prompt, chunk_index, on_gpu, nbytes]
        self._sessions: dict[SessionId, list[Any]] = {}
        self._bytes_by_shape: dict[str, int] = {}
        self._fixed_ms: dict[str, float] = {}
        self._failures: dict[SessionId, str] = {}

    # ----------------------------------------------------------------- test hooks
    def inject_failure(self, sid: SessionId, message: str = "injected failure") -> None:
        """The session's next chunk fails with `message` (tests of error isolation)."""
        self._failures[sid] = message

    # ------------------------------------------------------------------ sizes
    def estimate_bytes(self, spec: SessionSpec) -> int:
        """Bytes `add_session` will report for this spec (checked before creating it)."""
        nbytes = self._bytes_by_shape.get(spec.model)
        if nbytes is None:
            info = self.model.shape(spec.model)
            nbytes = int(self.model.state_bytes(spec.model, info.window_frames))
            self._bytes_by_shape[spec.model] = nbytes
        return nbytes

    def round_ms(self, shape: str, batch: int, mean_context: float, steps: int) -> float:
        """Modelled duration of one round (what `execute` reports)."""
        fixed = self._fixed_ms.get(shape)
        if fixed is None:
            fixed = self._fixed_ms[shape] = float(self.model.fixed_ms(shape))
        return self.model.round_ms(shape, batch, mean_context, steps) + batch * fixed

    # ---------------------------------------------------------- Executor protocol
    def add_session(self, session_id: SessionId, spec: SessionSpec, prompt: str) -> int:
        if session_id in self._sessions:
            raise ValueError(f"session {session_id!r} already exists in this executor")
        nbytes = self.estimate_bytes(spec)
        self._sessions[session_id] = [spec, prompt, 0, True, nbytes]
        return nbytes

    def remove_session(self, session_id: SessionId) -> None:
        self._sessions.pop(session_id, None)
        self._failures.pop(session_id, None)

    def set_prompt(self, session_id: SessionId, prompt: str) -> None:
        self._get(session_id)[1] = prompt

    def state_bytes(self, session_id: SessionId) -> int:
        return self._get(session_id)[4]

    def execute(self, plan: RoundPlan) -> RoundResult:
        sessions = self._sessions
        errors: dict[SessionId, str] = {}
        outputs: list[ChunkOutput] = []
        tag = self.frames
        for sid, idx in zip(plan.session_ids, plan.chunk_indices):
            s = sessions.get(sid)
            if s is None:
                errors[sid] = f"session {sid!r} is not in this executor"
            elif not s[3]:
                errors[sid] = f"session {sid!r} is offloaded; restore it before it runs"
            elif s[2] != idx:
                errors[sid] = f"session {sid!r} is at chunk {s[2]}, the plan asked for chunk {idx}"
            elif self._failures and sid in self._failures:
                errors[sid] = self._failures.pop(sid)
            else:
                s[2] = idx + 1
                outputs.append(chunk_output(sid, idx, tag_frames(sid, idx) if tag else None))
        n = len(plan.session_ids)
        key = plan.key
        duration = self.round_ms(key.model, n, sum(plan.context_frames) / n, key.steps) if n else 0.0
        tables = self._jitter.get(key.model)
        if tables is None:
            m = self.model
            tables = self._jitter[key.model] = (
                tuple(getattr(m, "jitter", lambda _: ())(key.model)),
                tuple(getattr(m, "jitter_shared", lambda _: ())(key.model)),
                getattr(m, "jitter_unit", lambda _: "ratio")(key.model) == "ms",
                getattr(m, "jitter_by_batch", lambda _: {})(key.model),
                getattr(m, "jitter_shared_by_batch", lambda _: {})(key.model))
        jitter, shared, added, by_batch, shared_by_batch = tables
        if jitter and n:
            host = self.host
            now_s = host.clock() if shared and host is not None else None
            busy = now_s is not None and host.others_busy(self, now_s)
            draw = _draw(self._rng, shared_by_batch.get(n, shared) if busy else by_batch.get(n, jitter))
            duration = max(MIN_ROUND_MS, duration + draw) if added else duration * draw
            if now_s is not None:
                host.mark(self, now_s + duration / 1000.0)
        return RoundResult(plan, tuple(outputs), duration, errors)

    def offload(self, session_id: SessionId) -> TransferResult:
        s = self._get(session_id)
        if not s[3]:
            raise ValueError(f"session {session_id!r} is already offloaded")
        s[3] = False
        return TransferResult(session_id, s[4], self._host_ms(s[4]))

    def restore(self, session_id: SessionId) -> TransferResult:
        s = self._get(session_id)
        if s[3]:
            raise ValueError(f"session {session_id!r} is not offloaded")
        s[3] = True
        return TransferResult(session_id, s[4], self._host_ms(s[4]))

    def export_state(self, session_id: SessionId) -> SessionBlob:
        """A description of the state; the session stays here until `remove_session`."""
        spec, prompt, idx, _on_gpu, nbytes = self._get(session_id)
        return SessionBlob(session_id, spec, prompt, idx, nbytes, payload=None)

    def import_state(self, blob: SessionBlob) -> int:
        if blob.session_id in self._sessions:
            raise ValueError(f"session {blob.session_id!r} already exists in this executor")
        nbytes = blob.nbytes or self.estimate_bytes(blob.spec)
        self._sessions[blob.session_id] = [blob.spec, blob.prompt, blob.chunk_index, True, nbytes]
        return nbytes

    def checkpoint(self, session_id: SessionId) -> Any:
        spec, prompt, idx, _on_gpu, _n = self._get(session_id)
        return {"spec": spec.to_dict(), "prompt": prompt, "chunk_index": idx}

    def rebuild(self, session_id: SessionId, ckpt: Any) -> int:
        spec = SessionSpec.from_dict(ckpt["spec"])
        blob = SessionBlob(session_id, spec, ckpt["prompt"], int(ckpt["chunk_index"]),
                           self.estimate_bytes(spec))
        return self.import_state(blob)

    # -------------------------------------------------------------------- internals
    def _get(self, sid: SessionId) -> list[Any]:
        try:
            return self._sessions[sid]
        except KeyError:
            raise KeyError(f"session {sid!r} is not in this executor") from None

    def _host_ms(self, nbytes: int) -> float:
        return transfer_ms(nbytes, self._host_alpha_ms, self._host_gbps)


_new_object = object.__new__
_set_attr = object.__setattr__
if tuple(f.name for f in fields(ChunkOutput)) != ("session_id", "chunk_index", "frames"):
    raise ImportError("engine/profiled.py builds ChunkOutput field by field: update chunk_output "
                      f"to its fields {[f.name for f in fields(ChunkOutput)]}")


def chunk_output(sid: SessionId, chunk_index: int, frames: Any = None) -> ChunkOutput:
    """`ChunkOutput(sid, chunk_index, frames)` without the frozen dataclass's per-field
    `__init__` (the simulator makes one per chunk; the result is equal field by field)."""
    out = _new_object(ChunkOutput)
    _set_attr(out, "__dict__", {"session_id": sid, "chunk_index": chunk_index, "frames": frames})
    return out


def session_tag(sid: SessionId) -> int:
    """A stable 32-bit tag of a session id (crc32), written into its synthetic frames."""
    return zlib.crc32(sid.encode())


def tag_frames(sid: SessionId, chunk_index: int):
    """uint8 (1, 8, 8, 3): row 0 holds the chunk index (little-endian, 8 bytes), row 1 the
    session tag (4 bytes), channel 0; the rest is a constant grey."""
    import numpy as np

    frame = np.full((1, 8, 8, 3), 128, dtype=np.uint8)
    frame[0, 0, :, 0] = np.frombuffer(int(chunk_index).to_bytes(8, "little"), dtype=np.uint8)
    frame[0, 1, :4, 0] = np.frombuffer(session_tag(sid).to_bytes(4, "little"), dtype=np.uint8)
    return frame


def read_tag(frames) -> tuple[int, int]:
    """(session tag, chunk index) written by `tag_frames`."""
    chunk = int.from_bytes(bytes(frames[0, 0, :, 0].tolist()), "little")
    tag = int.from_bytes(bytes(frames[0, 1, :4, 0].tolist()), "little")
    return tag, chunk
