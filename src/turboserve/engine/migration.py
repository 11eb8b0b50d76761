"""Live migration of one session between two engines, as an explicit state machine.

In: the session, the source and destination `EngineCore`s, the link (alpha-beta) and a
pluggable data move `transfer(blob) -> blob` (an in-process copy here; the torch engine
adds device copies and `torch.distributed` send/recv). The caller drives the phases at
the times its clock says (the simulator schedules them, a live transport runs them
inline or from its threads).
Out: a `MigrationReport` (ok or the abort reason, bytes moved, pre-copy time, downtime),
convertible to the controller's `MigrationFinished` event.

    PENDING --start--> PRECOPY --begin_stop, at a chunk boundary: stop_and_copy-->
    STOP_AND_COPY --commit--> COMMITTED
    any non-final phase --abort(reason)--> ABORTED

- PRECOPY: memory is reserved on the destination (none -> ABORTED `dst_no_memory`); the
  session keeps generating on the source while its state (`state_bytes`) is copied.
- STOP_AND_COPY: the session is held at a chunk boundary on the source; the delta, the
  state of the chunks generated during pre-copy, is copied; the data move happens here.
  Its duration is the session's downtime (its next chunk's due clock keeps running, so
  downtime shows in that chunk's latency).
- COMMITTED: the destination imports the state and continues at the same chunk index;
  the source drops it. Every chunk is delivered once and in order.
- ABORTED(reason), reasons in `ABORT_REASONS`: the reservation is released and the
  session is left intact and running on the source (for `src_lost` and `session_closed`
  there is nothing left to run, and the caller handles the session).
Durations are modelled with `policy.latency.transfer_ms` over the link; a live caller may
also read the measured wall time of the data move.
"""

from __future__ import annotations

import copy
import enum
import time
from dataclasses import dataclass
from typing import Callable

from ..config import LinkConfig
from ..events import MigrationFinished
from ..policy.latency import LatencyModel, transfer_ms
from ..types import SessionId, WorkerId
from .core import EngineCore, SessionInfo
from .executor import SessionBlob
from .state_pool import PoolFullError

ABORT_REASONS = ("dst_no_memory", "dst_lost", "src_lost", "transfer_failed", "session_closed")

TransferFn = Callable[[SessionBlob], SessionBlob]


class Phase(str, enum.Enum):
    PENDING = "pending"
    PRECOPY = "precopy"
    STOP_AND_COPY = "stop_and_copy"
    COMMITTED = "committed"
    ABORTED = "aborted"


class MigrationError(RuntimeError):
    """A phase was called out of order; the message names the phase it needs."""


def copy_transfer(blob: SessionBlob) -> SessionBlob:
    """In-process data move: a new blob object sharing the payload (same device)."""
    return copy.copy(blob)


def delta_bytes(model: LatencyModel | None, shape: str, state_bytes: int, chunks: int) -> int:
    """Bytes of state written by `chunks` chunks: what stop-and-copy sends after pre-copy.
    A chunk rewrites `latent_frames_per_chunk / window_frames` of a full-window state; with
    no profile for the shape, assume each chunk rewrites the whole state (the worst case)."""
    if chunks <= 0:
        return 0
    if model is not None:
        try:
            info = model.shape(shape)
        except (KeyError, ValueError, LookupError):
            info = None
        if info is not None and info.window_frames > 0:
            frac = min(1.0, chunks * info.latent_frames_per_chunk / info.window_frames)
            return int(state_bytes * frac)
    return state_bytes


@dataclass(frozen=True)
class MigrationReport:
    session_id: SessionId
    src: WorkerId
    dst: WorkerId
    ok: bool
    reason: str  # abort reason ("" when committed)
    bytes_moved: int  # pre-copy plus delta
    precopy_ms: float  # modelled pre-copy time (the session kept running)
    downtime_ms: float  # modelled stop-and-copy time (the session was held)
    measured_copy_ms: float  # wall time of the data move itself (0 when none ran)
    started_s: float
    finished_s: float

    def to_event(self) -> MigrationFinished:
        return MigrationFinished(time_s=self.finished_s, session_id=self.session_id, src=self.src,
                                 dst=self.dst, ok=self.ok, bytes_moved=self.bytes_moved,
                                 downtime_ms=self.downtime_ms, reason=self.reason)


class Migration:
    def __init__(self, session_id: SessionId, src: EngineCore, dst: EngineCore, *,
                 link: LinkConfig, transfer: TransferFn = copy_transfer) -> None:
        if src is dst:
            raise ValueError(f"migration of {session_id!r}: source and destination are the same engine")
        self.session_id = session_id
        self.src = src
        self.dst = dst
        self.link = link
        self.transfer = transfer
        self.phase = Phase.PENDING
        self.reason = ""
        self.reason_detail = ""  # the exception behind a transfer_failed abort
        self.started_s = 0.0
        self.state_bytes = 0
        self.precopy_ms = 0.0
        self.downtime_ms = 0.0
        self.delta_bytes = 0
        self.measured_copy_ms = 0.0
        self._chunk_at_start = 0
        self._blob: SessionBlob | None = None
        self._info: SessionInfo | None = None
        self._report: MigrationReport | None = None

    @property
    def done(self) -> bool:
        return self.phase in (Phase.COMMITTED, Phase.ABORTED)

    @property
    def report(self) -> MigrationReport | None:
        return self._report

    # ------------------------------------------------------------------- phases
    def start(self, now_s: float) -> float:
        """PENDING -> PRECOPY: reserve memory on the destination; returns the modelled
        pre-copy duration (ms). If the destination lacks memory the migration is ABORTED
        (`dst_no_memory`) and 0.0 is returned: check `done`."""
        self._need(Phase.PENDING, "start")
        self.started_s = now_s
        info = self.src.info(self.session_id)
        self.state_bytes = info.state_bytes
        self._chunk_at_start = info.chunk_index
        try:
            self.dst.reserve(self.session_id, self.state_bytes)
        except (PoolFullError, ValueError):
            self.phase = Phase.PRECOPY  # so abort's bookkeeping applies
            self._finish_abort("dst_no_memory", now_s, release_dst=False)
            return 0.0
        self.phase = Phase.PRECOPY
        self.precopy_ms = transfer_ms(self.state_bytes, self.link.alpha_ms, self.link.bandwidth_gbps)
        return self.precopy_ms

    def begin_stop(self) -> bool:
        """Pre-copy is done: hold the session on the source. Returns True when it is at a
        chunk boundary now; otherwise call `stop_and_copy` once its round has finished."""
        self._need(Phase.PRECOPY, "begin_stop")
        self.src.hold(self.session_id)
        return self.src.at_chunk_boundary(self.session_id)

    def ready_to_stop(self) -> bool:
        return self.phase is Phase.PRECOPY and self.src.at_chunk_boundary(self.session_id)

    def stop_and_copy(self, now_s: float) -> float:
        """PRECOPY -> STOP_AND_COPY: export the held session (it stays on the source until
        commit), move the data, and return the modelled downtime (ms). A failing data move
        ABORTS the migration (`transfer_failed`) and returns 0.0: check `done`."""
        self._need(Phase.PRECOPY, "stop_and_copy")
        sid = self.session_id
        self.src.hold(sid)  # idempotent; makes sure no new round picks it
        if not self.src.at_chunk_boundary(sid):
            raise MigrationError(f"session {sid!r} has a chunk in flight on {self.src.worker_id!r}; "
                                 "stop_and_copy must wait for the round to finish")
        self._info = self.src.info(sid)
        chunks = self._info.chunk_index - self._chunk_at_start
        self.delta_bytes = delta_bytes(self.src.model, self._info.spec.model, self.state_bytes, chunks)
        self.downtime_ms = transfer_ms(self.delta_bytes, self.link.alpha_ms, self.link.bandwidth_gbps)
        self.phase = Phase.STOP_AND_COPY
        t0 = time.perf_counter()
        try:
            blob = self.src.export(sid, keep=True)
            self._blob = self.transfer(blob)
        except Exception as e:  # noqa: BLE001 - any failure of the move aborts cleanly
            self.measured_copy_ms = (time.perf_counter() - t0) * 1000.0
            self.reason_detail = f"{type(e).__name__}: {e}"
            self._finish_abort("transfer_failed", now_s)
            return 0.0
        self.measured_copy_ms = (time.perf_counter() - t0) * 1000.0
        return self.downtime_ms

    def commit(self, now_s: float) -> MigrationReport:
        """STOP_AND_COPY -> COMMITTED: the destination imports the state (keeping the
        session's due time, activity and what its period still owes) and the source drops
        it. If the import fails the migration ABORTS (`dst_no_memory` when memory ran out,
        else `transfer_failed`) and the session runs on the source."""
        self._need(Phase.STOP_AND_COPY, "commit")
        blob = self._blob
        assert blob is not None
        # re-read: the session may have been paused or activated while held
        info = self.src.info(self.session_id) if self.session_id in self.src else self._info
        assert info is not None
        try:
            self.dst.import_session(blob, now_s, active=info.active, chunks_wanted=info.chunks_wanted,
                                    due_since_s=info.due_since_s)
        except PoolFullError:
            return self._finish_abort("dst_no_memory", now_s)
        except Exception as e:  # noqa: BLE001
            self.reason_detail = f"{type(e).__name__}: {e}"
            return self._finish_abort("transfer_failed", now_s)
        self.src.remove(self.session_id)
        self.phase = Phase.COMMITTED
        self._report = self._make_report(True, "", now_s)
        return self._report

    def abort(self, reason: str, now_s: float) -> MigrationReport:
        """Give up; the session stays (or runs again) on the source. Idempotent once done."""
        if reason not in ABORT_REASONS:
            raise ValueError(f"unknown abort reason {reason!r}; expected one of {ABORT_REASONS}")
        if self.done:
            assert self._report is not None
            return self._report
        return self._finish_abort(reason, now_s)

    def run(self, now_s: float) -> MigrationReport:
        """All phases at once (in-process callers between rounds): the session must be at a
        chunk boundary. The report's times are modelled from `now_s`."""
        self.start(now_s)
        if self.done:
            assert self._report is not None
            return self._report
        if not self.begin_stop():
            self._finish_abort("transfer_failed", now_s)
            raise MigrationError(f"session {self.session_id!r} has a chunk in flight; run() needs "
                                 "a chunk boundary (drive the phases one by one instead)")
        self.stop_and_copy(now_s)
        if self.done:
            assert self._report is not None
            return self._report
        return self.commit(now_s + (self.precopy_ms + self.downtime_ms) / 1000.0)

    # ---------------------------------------------------------------- internals
    def _need(self, phase: Phase, action: str) -> None:
        if self.phase is not phase:
            raise MigrationError(f"migration of {self.session_id!r}: {action} needs phase "
                                 f"{phase.value}, it is {self.phase.value}")

    def _finish_abort(self, reason: str, now_s: float, *, release_dst: bool = True) -> MigrationReport:
        sid = self.session_id
        if release_dst and reason != "dst_lost":
            self.dst.cancel_reservation(sid)
        elif release_dst:  # the destination is gone; its bookkeeping may still exist
            try:
                self.dst.cancel_reservation(sid)
            except Exception:  # noqa: BLE001
                pass
        if reason not in ("src_lost", "session_closed") and sid in self.src:
            self.src.unhold(sid, now_s)
        self._blob = None
        self.phase = Phase.ABORTED
        self.reason = reason
        self._report = self._make_report(False, reason, now_s)
        return self._report

    def _make_report(self, ok: bool, reason: str, now_s: float) -> MigrationReport:
        moved = self.state_bytes + self.delta_bytes if ok else 0
        return MigrationReport(self.session_id, self.src.worker_id, self.dst.worker_id, ok, reason,
                               moved, self.precopy_ms, self.downtime_ms if ok else 0.0,
                               self.measured_copy_ms, self.started_s, now_s)
