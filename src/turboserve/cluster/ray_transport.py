"""`RayTransport`: every worker a Ray actor holding one engine, for clusters beyond one machine.

In: the controller's commands (the `Transport` protocol) on the driver. Out: the same events
as `LocalTransport` (through `emit`) and every finished round with its frames (`on_round`),
carried back from the actors.

Each actor (`EngineHost`) runs a one-slot `LocalTransport` inside its own process, so the
engine loop, command ordering at chunk boundaries and failure isolation are the local
transport's, unchanged. The actor asks Ray for one GPU (`num_gpus=1`) when the cluster has
GPUs, so Ray's scheduler places workers on nodes and its autoscaler provisions them; with
`gpus_per_worker=0` it runs on CPUs (tests). The driver long-polls each actor for events
and rounds on a thread per actor. Actors stamp times on their own monotonic clock aligned
to the driver's at creation; a round's latency is measured within one actor, so the small
offset only shifts event times.

Moves between actors go through Ray's object store (host memory): migration is hold +
export on the source (tensors to CPU), import on the destination with the session's due
time kept, then removal on the source, or an abort that releases the hold. A session
resumed on another worker than the one holding its host copy moves the same way; the host
copies of a released worker's offloaded sessions are kept on the driver until resumed.
Orchestration runs on a small thread pool so the controller never waits on a transfer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..events import Event, MigrationFinished, RestoreFinished, SessionFailed, WorkerLost
from ..types import SessionId, SessionSpec, WorkerId
from .transport import LandingCommands

log = logging.getLogger(__name__)


class EngineHost:
    """The body of a worker actor: one engine behind a one-slot `LocalTransport`."""

    def __init__(self, wid: WorkerId, make_generator: Callable[[str], object], device: str,
                 memory_bytes: int, max_batch: int, driver_now_s: float, model=None):
        from ..engine.torch_executor import TorchExecutor
        from .local import LocalTransport

        self._origin = (driver_now_s, time.monotonic())
        self.wid = wid
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self.transport = LocalTransport(lambda w, d: TorchExecutor(make_generator(d), device=d), [device],
                                        clock=self.now, max_batch=max_batch, model=model,
                                        on_round=lambda w, o: self._out.put(("round", o)))
        self.transport.bind(lambda ev: self._out.put(("event", ev)))
        self.transport.start_worker(wid, self.now(), memory_bytes=memory_bytes, ready=True)

    def now(self) -> float:
        base, mono = self._origin
        return base + (time.monotonic() - mono)

    def ping(self) -> bool:
        return True

    def poll(self, timeout_s: float = 0.5) -> list:
        """Events and rounds since the last poll (waits up to `timeout_s` for the first)."""
        items = []
        try:
            items.append(self._out.get(timeout=timeout_s))
            while True:
                items.append(self._out.get_nowait())
        except queue.Empty:
            pass
        return items

    # commands: the Transport protocol for this one worker
    def place(self, sid, spec, prompt, now_s, from_host, active, chunks_wanted):
        self.transport.place(sid, spec, prompt, self.wid, now_s, from_host=from_host, active=active,
                             chunks_wanted=chunks_wanted)

    def activate(self, sid, now_s, chunks_wanted):
        self.transport.activate(sid, self.wid, now_s, chunks_wanted)

    def pause(self, sid, now_s):
        self.transport.pause(sid, self.wid, now_s)

    def offload(self, sid, now_s):
        self.transport.offload(sid, self.wid, now_s)

    def close(self, sid, now_s):
        self.transport.close(sid, self.wid, now_s)

    def set_prompt(self, sid, prompt):
        self.transport.set_prompt(sid, prompt)

    # moves between actors
    def hold_and_export(self, sid, *, keep: bool):
        """(blob with CPU tensors, active, chunks_wanted, due_since_s); with keep the session
        stays here, held, until `commit_export` or `abort_export`."""
        from .local import _copy_to

        def run(engine):
            info = engine.info(sid)
            if keep:
                engine.hold(sid)
            blob = _copy_to(engine.export(sid, keep=keep), "cpu")
            return blob, info.active, info.chunks_wanted, info.due_since_s
        out = self.transport.call(self.wid, run).result(timeout=120)
        if not keep:
            self.transport.note_location(sid, None)
        return out

    def commit_export(self, sid):
        self.transport.call(self.wid, lambda e: sid in e and e.remove(sid)).result(timeout=60)

    def abort_export(self, sid):
        self.transport.call(self.wid, lambda e: sid in e and e.unhold(sid, self.now())).result(timeout=60)

    def import_blob(self, blob, active, chunks_wanted, due_since_s):
        from .local import _copy_to

        device = self.transport.devices[0]

        def run(engine):
            engine.import_session(_copy_to(blob, device), self.now(), active=active,
                                  chunks_wanted=chunks_wanted, due_since_s=due_since_s)
            return blob.nbytes
        nbytes = self.transport.call(self.wid, run).result(timeout=120)
        self.transport.note_location(blob.session_id, self.wid)
        return nbytes

    def park_offloaded(self) -> list:
        """Blobs (CPU) of the sessions in this engine's host tier, removed here: the driver
        keeps them when the worker is released."""
        from .local import _copy_to

        def run(engine):
            return [_copy_to(engine.export(sid), "cpu") for sid in engine.snapshot().offloaded]
        blobs = self.transport.call(self.wid, run).result(timeout=120)
        for blob in blobs:
            self.transport.note_location(blob.session_id, None)
        return blobs

    def shutdown(self):
        self.transport.shutdown()


class RayTransport:
    def __init__(self, make_generator: Callable[[str], object], *, slots: int, gpus_per_worker: float = 1.0,
                 cpus_per_worker: float = 1.0, max_batch: int = 32, model=None,
                 clock: Callable[[], float] | None = None, on_round=None):
        import ray

        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, log_to_driver=False)
        self._ray = ray
        self._actor_cls = ray.remote(EngineHost).options(num_gpus=gpus_per_worker, num_cpus=cpus_per_worker,
                                                        max_concurrency=8)
        self._make_generator = make_generator
        self._device = "cuda" if gpus_per_worker else "cpu"
        self._slots = slots
        self._max_batch = max_batch
        self._model = model
        self._clock = clock or time.monotonic
        self._on_round = on_round
        self._emit: Callable[[Event], None] = lambda e: None
        self._actors: dict[WorkerId, object] = {}
        self._pollers: dict[WorkerId, threading.Event] = {}
        self._where: dict[SessionId, WorkerId] = {}
        self._last_round_ms: dict[WorkerId, float] = {}
        self._parked: dict[SessionId, object] = {}  # host state of sessions whose worker was released
        self._landing = LandingCommands()  # commands for sessions whose state is still landing
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ray-moves")

    def bind(self, emit) -> None:
        self._emit = emit

    def set_clock(self, clock) -> None:
        self._clock = clock

    def set_round_hook(self, on_round) -> None:
        self._on_round = on_round

    def worker_stats(self) -> dict:
        with self._lock:
            return {wid: {"device": f"ray:{self._device}", "last_round_ms": self._last_round_ms.get(wid, 0.0)}
                    for wid in self._actors}

    # ------------------------------------------------------------------ workers
    def start_worker(self, wid: WorkerId, now_s: float, *, memory_bytes: int, ready: bool = False) -> None:
        with self._lock:
            if wid in self._actors or len(self._actors) >= self._slots:
                full = wid not in self._actors
            else:
                full = False
                self._actors[wid] = self._actor_cls.remote(wid, self._make_generator, self._device, memory_bytes,
                                                           self._max_batch, self._clock(), self._model)
        if full:
            self._emit(WorkerLost(self._clock(), wid))
            return
        actor = self._actors[wid]
        if ready:
            self._ray.get(actor.ping.remote())  # bootstrap: the controller counts it ready now
        stop = threading.Event()
        self._pollers[wid] = stop
        threading.Thread(target=self._poll, args=(wid, actor, stop), name=f"poll-{wid}", daemon=True).start()

    def _poll(self, wid: WorkerId, actor, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                items = self._ray.get(actor.poll.remote(0.5))
            except Exception as e:  # noqa: BLE001 - the actor died: its worker is lost
                if not stop.is_set():
                    log.warning("worker %s lost: %s", wid, e)
                    self._emit(WorkerLost(self._clock(), wid))
                return
            for kind, item in items:
                if kind == "round":
                    self._last_round_ms[wid] = item.duration_ms
                    if self._on_round is not None:
                        self._on_round(wid, item)
                else:
                    self._emit(item)

    def release_worker(self, wid: WorkerId, now_s: float) -> None:
        actor = self._actor(wid)
        if actor is not None:
            # Sessions offloaded there survive the worker: their state stays on the driver.
            try:
                for blob in self._ray.get(actor.park_offloaded.remote(), timeout=120):
                    with self._lock:
                        self._parked[blob.session_id] = blob
                        self._where.pop(blob.session_id, None)
            except Exception as e:  # noqa: BLE001
                log.warning("worker %s: offloaded sessions could not be kept: %s", wid, e)
        stop = self._pollers.pop(wid, None)
        if stop is not None:
            stop.set()
        with self._lock:
            actor = self._actors.pop(wid, None)
        if actor is not None:
            self._ray.kill(actor)

    def shutdown(self) -> None:
        for wid in list(self._actors):
            self.release_worker(wid, self._clock())
        self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ sessions
    def _actor(self, wid: WorkerId | None):
        with self._lock:
            return self._actors.get(wid) if wid is not None else None

    def place(self, sid: SessionId, spec: SessionSpec, prompt: str, wid: WorkerId, now_s: float, *,
              from_host: bool, active: bool, chunks_wanted: int,
              due_since_s: float | None = None) -> None:
        dst = self._actor(wid)
        if dst is None:
            self._emit(SessionFailed(self._clock(), sid, f"worker {wid} is gone", wid))
            return

        def land(fetch_blob: Callable[[], object]) -> None:
            """On the pool: import the session's host copy (`fetch_blob()`) on `wid`."""
            try:
                nbytes = self._ray.get(dst.import_blob.remote(fetch_blob(), active, chunks_wanted, now_s))
                self._where[sid] = wid
                for command in self._landing.landed(sid):
                    self._ray.get(command(dst))
                self._emit(RestoreFinished(self._clock(), sid, wid, nbytes))
            except Exception as e:  # noqa: BLE001
                self._landing.dropped(sid)
                self._emit(SessionFailed(self._clock(), sid, f"restore on {wid} failed: {e}", wid))

        with self._lock:
            parked = self._parked.pop(sid, None)
        if parked is not None:
            self._landing.expect(sid)
            self._pool.submit(land, lambda: parked)
            return
        holder = self._where.get(sid)
        if not from_host or holder == wid:
            self._where[sid] = wid
            dst.place.remote(sid, spec, prompt, now_s, from_host, active, chunks_wanted)
            return
        src = self._actor(holder)
        if src is None:
            self._emit(SessionFailed(self._clock(), sid, f"the worker holding its state ({holder}) is gone", wid))
            return
        # the blob is the first of what hold_and_export returns
        self._landing.expect(sid)
        self._pool.submit(land, lambda: self._ray.get(src.hold_and_export.remote(sid, keep=False))[0])

    def migrate(self, sid: SessionId, src: WorkerId, dst: WorkerId, now_s: float) -> None:
        a, b = self._actor(src), self._actor(dst)

        def abort(reason):
            self._emit(MigrationFinished(self._clock(), sid, src, dst, ok=False, reason=reason))
        if a is None or b is None:
            return abort("src_lost" if a is None else "dst_lost")

        def move():
            started = self._clock()
            try:
                blob, active, wanted, due = self._ray.get(a.hold_and_export.remote(sid, keep=True))
            except Exception as e:  # noqa: BLE001
                return abort(f"transfer_failed: {e}")
            try:
                self._ray.get(b.import_blob.remote(blob, active, wanted, due))
            except Exception as e:  # noqa: BLE001 - no memory there: the session runs on at the source
                a.abort_export.remote(sid)
                return abort("dst_no_memory" if "PoolFull" in repr(e) else f"transfer_failed: {e}")
            self._where[sid] = dst
            downtime_ms = (self._clock() - started) * 1000.0
            self._ray.get(a.commit_export.remote(sid))
            self._emit(MigrationFinished(self._clock(), sid, src, dst, ok=True, bytes_moved=blob.nbytes,
                                         downtime_ms=downtime_ms))
        self._pool.submit(move)

    def offload(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        self._send(sid, wid, lambda actor: actor.offload.remote(sid, now_s))

    def activate(self, sid: SessionId, wid: WorkerId, now_s: float, chunks_wanted: int) -> None:
        self._send(sid, wid, lambda actor: actor.activate.remote(sid, now_s, chunks_wanted))

    def pause(self, sid: SessionId, wid: WorkerId, now_s: float) -> None:
        self._send(sid, wid, lambda actor: actor.pause.remote(sid, now_s))

    def _send(self, sid: SessionId, wid: WorkerId, command: Callable[[object], object]) -> None:
        """Call `command(actor)` on `wid`'s actor, or once the session's state lands there."""
        if self._landing.defer(sid, command):
            return
        actor = self._actor(wid)
        if actor is not None:
            command(actor)

    def close(self, sid: SessionId, wid: WorkerId | None, now_s: float) -> None:
        with self._lock:
            self._parked.pop(sid, None)
        self._send(sid, self._where.pop(sid, None) or wid, lambda actor: actor.close.remote(sid, now_s))

    def set_prompt(self, sid: SessionId, prompt: str) -> None:
        actor = self._actor(self._where.get(sid))
        if actor is not None:
            actor.set_prompt.remote(sid, prompt)
