"""The torch executor: the `Executor` interface over a real `ChunkGenerator` on one device.

In: session commands from `EngineCore` (add, remove, prompt, offload, restore, export,
import, checkpoint, rebuild) and `RoundPlan`s. Out: `RoundResult`s with real uint8 frames
and the measured round duration, `TransferResult`s, `SessionBlob`s whose payload is the
session's `StreamState`.

Every session's state lives in one of two tiers: the *device* tier (tensors on
`self.device`, where rounds run) or the *host* tier (CPU tensors, pinned on CUDA so copies
are DMA). Moving a session between tiers moves every tensor of its flat state.

On CUDA, copies run on a side stream ordered after the compute stream's writes and
signalled back by an event, so offload/restore overlap with rounds: a restore returns at
once and the next round's compute waits for its copy on the GPU, not on the host. The
allocator is told which stream last uses each tensor (`record_stream`), so dropping the
device copy after an offload is safe before the copy finishes. On CPU copies are plain
synchronous copies of the same code path.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..models.base import Checkpoint, ChunkGenerator, StreamState
from ..types import SessionId, SessionSpec
from .executor import ChunkOutput, RoundPlan, RoundResult, SessionBlob, TransferResult

DEFAULT_RECYCLE_BYTES = 2 * 2**30  # most freed tier-copy buffer bytes kept for reuse, per tier
DEVICE_TIER = "device"
HOST_TIER = "host"
_OWNER = "_turboserve_tier_owner"  # tensor attribute: the executor token that allocated it


class ExecutorError(RuntimeError):
    """A session command the executor cannot carry out (unknown session, wrong tier...)."""


@dataclass
class _Entry:
    state: StreamState
    tier: str  # DEVICE_TIER or HOST_TIER
    ready: Any = None  # torch.cuda.Event marking the end of the last copy; None = ready now
    # Only tensors this executor allocated (tagged with its `_token`) may be recycled, and
    # only while no export, checkpoint or inspection has handed them out (`exposed`).
    exposed: bool = False


class _BufferPool:
    """Recycles tier-copy buffers by (shape, dtype), up to `capacity_bytes` held.

    Fresh large host allocations are page-faulted on first touch, which makes a copy into
    them 2-4x slower than into a reused buffer (measured on the 2-core CI machine: 4-5 GB/s
    against 16 GB/s at 256 MiB). Offload and restore alternate, so each direction's freed
    buffers feed the other's next copy. On CUDA the device side needs none of this (the
    caching allocator, made stream-safe by `record_stream`)."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = max(0, int(capacity_bytes))
        self.held_bytes = 0
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        bucket = self._free.get((tuple(shape), dtype))
        if not bucket:
            return None
        t = bucket.pop()
        self.held_bytes -= t.numel() * t.element_size()
        return t

    def give(self, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if nbytes == 0 or self.held_bytes + nbytes > self.capacity_bytes:
            return
        self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)
        self.held_bytes += nbytes

    def clear(self) -> None:
        self._free.clear()
        self.held_bytes = 0


class TorchExecutor:
    """Runs coalesced rounds of a `ChunkGenerator` and keeps its sessions' state in two tiers."""

    state_grows = True  # KV / VAE caches fill chunk by chunk: the engine re-books bytes per round

    def __init__(self, generator: ChunkGenerator, *, device: str | torch.device | None = None,
                 host_pinned: bool = True, recycle_bytes: int = DEFAULT_RECYCLE_BYTES):
        self.generator = generator
        self.device = torch.device(device) if device is not None else torch.device(generator.device)
        if self.device.type != torch.device(generator.device).type:
            raise ValueError(
                f"executor device {self.device} differs from the generator's {generator.device}; "
                "load the generator on the device the executor runs on"
            )
        self.is_cuda = self.device.type == "cuda"
        self.host_pinned = bool(host_pinned) and self.is_cuda
        self._entries: dict[SessionId, _Entry] = {}
        # Side stream for tier copies: lets offload/restore overlap the compute stream.
        self._copy_stream = torch.cuda.Stream(device=self.device) if self.is_cuda else None
        self._token = object()  # tags the copy buffers this executor allocates
        self._host_pool = _BufferPool(recycle_bytes)
        self._device_pool = None if self.is_cuda else _BufferPool(recycle_bytes)

    # ----------------------------------------------------------------------------- sessions
    def add_session(self, session_id: SessionId, spec: SessionSpec, prompt: str) -> int:
        if session_id in self._entries:
            raise ExecutorError(f"session {session_id!r} already exists on this executor")
        spec = self.generator.validate_spec(spec)
        state = self.generator.start_session(session_id, spec, prompt)
        self._entries[session_id] = _Entry(state, DEVICE_TIER)
        return state.nbytes()

    def remove_session(self, session_id: SessionId) -> None:
        self._entries.pop(session_id, None)

    def set_prompt(self, session_id: SessionId, prompt: str) -> None:
        self.generator.set_prompt(self._entry(session_id).state, prompt)

    def state_bytes(self, session_id: SessionId) -> int:
        return self._entry(session_id).state.nbytes()

    def has_session(self, session_id: SessionId) -> bool:
        return session_id in self._entries

    def session_ids(self) -> list[SessionId]:
        return list(self._entries)

    def next_chunk_index(self, session_id: SessionId) -> int:
        return self._entry(session_id).state.chunk_index

    def tier(self, session_id: SessionId) -> str:
        """`"device"` or `"host"`: where the session's tensors are."""
        return self._entry(session_id).tier

    def stream_state(self, session_id: SessionId) -> StreamState:
        """The live state (for inspection and tests; the executor owns it). Its tensors are
        treated as shared from now on (never recycled)."""
        entry = self._entry(session_id)
        self._host_ready(entry)
        entry.exposed = True
        return entry.state

    def device_bytes(self) -> int:
        return sum(e.state.nbytes() for e in self._entries.values() if e.tier == DEVICE_TIER)

    def host_bytes(self) -> int:
        return sum(e.state.nbytes() for e in self._entries.values() if e.tier == HOST_TIER)

    # -------------------------------------------------------------------------------- rounds
    def execute(self, plan: RoundPlan) -> RoundResult:
        """One coalesced `generator.generate` over the plan's sessions.

        A session that cannot run (unknown, offloaded, out of step with the plan) or whose
        generation raises is reported in `errors`; the others still get their chunks. On a
        raising batch the batch is split in halves and retried, so one bad session costs
        O(log batch) extra forwards instead of failing everyone.
        """
        if len(plan.chunk_indices) != len(plan.session_ids):
            raise ValueError("RoundPlan.chunk_indices must have one entry per session")
        errors: dict[SessionId, str] = {}
        runnable: list[tuple[SessionId, int, StreamState]] = []
        for sid, chunk_index in zip(plan.session_ids, plan.chunk_indices):
            entry = self._entries.get(sid)
            if entry is None:
                errors[sid] = "unknown session on this executor"
            elif entry.tier != DEVICE_TIER:
                errors[sid] = "session state is offloaded to host memory; restore it before running"
            elif entry.state.chunk_index != chunk_index:
                errors[sid] = (f"plan asks for chunk {chunk_index} but the session's next chunk is "
                               f"{entry.state.chunk_index}")
            else:
                self._wait_on_compute_stream(entry)
                runnable.append((sid, chunk_index, entry.state))

        start = time.perf_counter()
        frames: dict[SessionId, torch.Tensor] = {}
        if runnable:
            self._generate_isolated([(sid, st) for sid, _, st in runnable], frames, errors)
            if self.is_cuda:
                torch.cuda.synchronize(self.device)
        duration_ms = (time.perf_counter() - start) * 1000.0

        outputs = tuple(
            ChunkOutput(sid, idx, _to_numpy(frames[sid])) for sid, idx, _ in runnable if sid in frames
        )
        return RoundResult(plan=plan, outputs=outputs, duration_ms=duration_ms, errors=errors)

    def _generate_isolated(self, batch: Sequence[tuple[SessionId, StreamState]],
                           frames: dict[SessionId, torch.Tensor], errors: dict[SessionId, str]) -> None:
        # Families validate before they write a session's tensors, so restoring each state's
        # bookkeeping (and tensor references) undoes a failed call; see ChunkGenerator.generate.
        saved = [_shallow_snapshot(st) for _, st in batch]
        try:
            out = self.generator.generate([st for _, st in batch])
            if len(out) != len(batch):
                raise RuntimeError(f"generator returned {len(out)} chunks for {len(batch)} sessions")
        except Exception as exc:  # noqa: BLE001 - isolate whatever the model raises
            for (_, st), snap in zip(batch, saved):
                _restore_snapshot(st, snap)
            if len(batch) == 1:
                errors[batch[0][0]] = f"{type(exc).__name__}: {exc}"
                return
            mid = len(batch) // 2
            self._generate_isolated(batch[:mid], frames, errors)
            self._generate_isolated(batch[mid:], frames, errors)
            return
        for (sid, _), f in zip(batch, out):
            frames[sid] = f

    # ------------------------------------------------------------------------ tier movement
    def offload(self, session_id: SessionId) -> TransferResult:
        """Move the state to the host tier. On CUDA the copy is enqueued on the side stream
        and this returns at once; `duration_ms` is then the time to enqueue (see `synchronize`)."""
        entry = self._entry(session_id)
        if entry.tier == HOST_TIER:
            return TransferResult(session_id, 0, 0.0)
        start = time.perf_counter()
        self._copy_tensors(entry, torch.device("cpu"), pin=self.host_pinned)
        entry.tier = HOST_TIER
        return TransferResult(session_id, entry.state.nbytes(), (time.perf_counter() - start) * 1000.0)

    def restore(self, session_id: SessionId) -> TransferResult:
        """Move the state back to the device tier; the next round waits for the copy on the GPU."""
        entry = self._entry(session_id)
        if entry.tier == DEVICE_TIER:
            return TransferResult(session_id, 0, 0.0)
        start = time.perf_counter()
        self._copy_tensors(entry, self.device, pin=False)
        entry.tier = DEVICE_TIER
        return TransferResult(session_id, entry.state.nbytes(), (time.perf_counter() - start) * 1000.0)

    def release_buffers(self) -> None:
        """Drop recycled copy buffers (memory back to the allocator)."""
        self._host_pool.clear()
        if self._device_pool is not None:
            self._device_pool.clear()

    def synchronize(self) -> None:
        """Wait for every enqueued tier copy (benchmarks and shutdown; never in a round)."""
        for entry in self._entries.values():
            if entry.ready is not None:
                entry.ready.synchronize()
                entry.ready = None

    def _copy_tensors(self, entry: _Entry, dst: torch.device, *, pin: bool) -> None:
        """Replace the entry's tensors by copies on `dst`, recycling buffers where safe."""
        tensors = entry.state.tensors
        to_host = entry.tier == DEVICE_TIER
        dst_pool = self._host_pool if to_host else self._device_pool
        src_pool = self._device_pool if to_host else self._host_pool
        token = self._token
        recyclable = [] if entry.exposed else [t for t in tensors.values() if getattr(t, _OWNER, None) is token]
        out: dict[str, torch.Tensor] = {}
        if self._copy_stream is None:
            for name, t in tensors.items():
                buf = dst_pool.take(t.shape, t.dtype) if dst_pool is not None else None
                if buf is None:
                    buf = torch.empty(t.shape, dtype=t.dtype, device=dst)
                    setattr(buf, _OWNER, token)
                buf.copy_(t)
                out[name] = buf
            event = None
        else:
            compute = torch.cuda.current_stream(self.device)
            side = self._copy_stream
            if to_host:
                # The copy must see the compute stream's last writes to the state. A restore
                # reads host buffers only the side stream wrote, so it does not wait for the
                # round in flight: that is the overlap.
                side.wait_stream(compute)
            if entry.ready is not None:  # an earlier copy of this state (same stream: cheap)
                side.wait_event(entry.ready)
            with torch.cuda.stream(side):
                for name, t in tensors.items():
                    buf = dst_pool.take(t.shape, t.dtype) if dst_pool is not None else None
                    if buf is None:
                        if to_host:
                            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                        else:
                            buf = torch.empty(t.shape, dtype=t.dtype, device=dst)
                        setattr(buf, _OWNER, token)
                    buf.copy_(t, non_blocking=True)
                    if t.is_cuda:
                        t.record_stream(side)  # the source may be freed only after the copy
                    if buf.is_cuda:
                        buf.record_stream(compute)  # allocated on side, used on compute
                    out[name] = buf
            event = torch.cuda.Event()
            event.record(side)
        if src_pool is not None:
            # Host buffers are reused only by later copies on the same side stream (ordered
            # after this one), and on CPU the copy is already done: recycling is safe.
            for t in recyclable:
                src_pool.give(t)
        entry.state.tensors = out
        entry.ready = event
        entry.exposed = False

    def _wait_on_compute_stream(self, entry: _Entry) -> None:
        if entry.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.ready)
            entry.ready = None

    def _host_ready(self, entry: _Entry) -> None:
        """Before the CPU reads a state's tensors: wait for its copy to land."""
        if entry.ready is not None:
            if entry.tier == HOST_TIER:
                entry.ready.synchronize()
            else:
                torch.cuda.current_stream(self.device).wait_event(entry.ready)
            entry.ready = None

    # --------------------------------------------------------------------- migration/recovery
    def export_state(self, session_id: SessionId) -> SessionBlob:
        """The session's state as a blob; the source keeps its copy until it removes the session
        (migration aborts leave it intact). The payload shares tensors with the live state:
        the session must not run until the migration commits or aborts."""
        entry = self._entry(session_id)
        self._host_ready(entry)
        entry.exposed = True  # the blob shares these tensors: never recycle them
        st = entry.state
        payload = StreamState(session_id=st.session_id, spec=st.spec, prompt=st.prompt,
                              chunk_index=st.chunk_index, tensors=dict(st.tensors),
                              meta=copy.deepcopy(st.meta))
        return SessionBlob(session_id=session_id, spec=st.spec, prompt=st.prompt,
                           chunk_index=st.chunk_index, nbytes=st.nbytes(), payload=payload)

    def import_state(self, blob: SessionBlob) -> int:
        """Adopt a migrated session; its tensors are copied here if they live elsewhere."""
        if blob.session_id in self._entries:
            raise ExecutorError(f"session {blob.session_id!r} already exists on this executor")
        payload = blob.payload
        if not isinstance(payload, StreamState):
            raise ExecutorError(
                f"blob of session {blob.session_id!r} carries {type(payload).__name__}, not a StreamState; "
                "it was exported by a different executor kind"
            )
        self.generator.validate_spec(payload.spec)
        tensors = {k: (t if t.device == self.device else t.to(self.device)) for k, t in payload.tensors.items()}
        state = StreamState(session_id=blob.session_id, spec=payload.spec, prompt=payload.prompt,
                            chunk_index=payload.chunk_index, tensors=tensors, meta=copy.deepcopy(payload.meta))
        self._entries[blob.session_id] = _Entry(state, DEVICE_TIER)
        return state.nbytes()

    def checkpoint(self, session_id: SessionId) -> Checkpoint:
        entry = self._entry(session_id)
        self._host_ready(entry)
        entry.exposed = True  # a checkpoint may hold views of the state's tensors
        return self.generator.checkpoint(entry.state)

    def rebuild(self, session_id: SessionId, ckpt: Checkpoint) -> int:
        if session_id in self._entries:
            raise ExecutorError(f"session {session_id!r} already exists on this executor")
        if not isinstance(ckpt, Checkpoint):
            raise ExecutorError(f"rebuild needs a Checkpoint, got {type(ckpt).__name__}")
        state = self.generator.rebuild(ckpt)
        state.session_id = session_id
        self._entries[session_id] = _Entry(state, DEVICE_TIER)
        return state.nbytes()

    # -------------------------------------------------------------------------------- helpers
    def _entry(self, session_id: SessionId) -> _Entry:
        try:
            return self._entries[session_id]
        except KeyError:
            raise ExecutorError(f"unknown session {session_id!r} on this executor") from None


def _shallow_snapshot(st: StreamState) -> tuple:
    return st.chunk_index, st.prompt, dict(st.tensors), copy.deepcopy(st.meta)


def _restore_snapshot(st: StreamState, snap: tuple) -> None:
    st.chunk_index, st.prompt, tensors, meta = snap
    st.tensors.clear()
    st.tensors.update(tensors)
    st.meta.clear()
    st.meta.update(meta)


def _to_numpy(frames: Any) -> Any:
    if isinstance(frames, torch.Tensor):
        return frames.detach().cpu().numpy()
    return frames
