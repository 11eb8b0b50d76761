"""Test doubles for pure policy tests: a linear latency model and a tiny instant cluster.

`FakeLatencyModel` implements `policy.latency.LatencyModel` with closed-form numbers so
tests can reason about loads. `FakeCluster` holds workers and sessions, builds a
`ClusterView` from scratch on every call (brute force: groups, loads and memory recomputed
from the sessions, the reference the policies' incremental what-ifs must match), and
applies a `Decision` the way the controller does (`cluster.state` semantics), instantly or
with migrations and offloads left in flight.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from types import MappingProxyType

from turboserve.config import TurboConfig
from turboserve.policy.latency import ShapeInfo
from turboserve.policy.load import GroupLoad, cycle_ms
from turboserve.policy.views import ClusterView, Decision, SessionView, WorkerView, spec_slo_ms
from turboserve.types import SessionSpec, SessionState, WorkerState

GB = 10**9


@dataclass(frozen=True)
class FakeShape:
    info: ShapeInfo
    base_ms: float = 20.0  # per round, at 4 steps
    per_session_ms: float = 15.0  # per session in a round at zero context, at 4 steps
    context_factor: float = 0.02  # relative cost per latent frame of context
    fixed_ms: float = 5.0  # per session per chunk, not coalesced
    state_base_bytes: int = 100 * 10**6
    state_per_frame_bytes: int = 50 * 10**6
    activation_per_session_bytes: int = 200 * 10**6


def fake_shape(name: str = "fake", **kw) -> FakeShape:
    info = ShapeInfo(name=name, latent_frames_per_chunk=3, video_frames_per_chunk=12, fps=16.0,
                     window_frames=21, passes=5, weights_bytes=10 * GB, gpu_memory_bytes=80 * GB)
    info_kw = {k: kw.pop(k) for k in list(kw) if k in ShapeInfo.__dataclass_fields__}
    return FakeShape(info=replace(info, **info_kw), **kw)


class FakeLatencyModel:
    """Round time linear in batch and context; state linear in context."""

    # rounds never get faster with batch or context (context_factor >= 0 in every shape
    # here), contexts stop at the window: the policies' bounds may rely on it
    round_ms_monotone = True

    def __init__(self, *shapes: FakeShape):
        shapes = shapes or (fake_shape(),)
        self.shapes = {s.info.name: s for s in shapes}
        self.calls = 0

    def shape(self, name: str) -> ShapeInfo:
        return self.shapes[name].info

    def round_ms(self, shape: str, batch: int, context_frames: float, steps: int) -> float:
        self.calls += 1
        s = self.shapes[shape]
        scale = (steps + 1) / 5.0
        return scale * (s.base_ms + s.per_session_ms * batch * (1.0 + s.context_factor * context_frames))

    def fixed_ms(self, shape: str) -> float:
        return self.shapes[shape].fixed_ms

    def state_bytes(self, shape: str, context_frames: float) -> int:
        s = self.shapes[shape]
        return int(s.state_base_bytes + s.state_per_frame_bytes * context_frames)

    def activation_bytes(self, shape: str, batch: int) -> int:
        return self.shapes[shape].activation_per_session_bytes * batch

    def context_after(self, shape: str, chunks_done: int) -> int:
        info = self.shapes[shape].info
        return min(info.window_frames, chunks_done * info.latent_frames_per_chunk)

    def capacity(self, shape: str, slo_ms: float, steps: int) -> int:
        window = self.shapes[shape].info.window_frames
        n = 0
        while n < 1000 and self.round_ms(shape, n + 1, window, steps) + (n + 1) * self.fixed_ms(shape) <= slo_ms:
            n += 1
        return n


def spec(model: str = "fake", steps: int = 4, frames: int = 12, fps: float = 16.0) -> SessionSpec:
    return SessionSpec(model=model, fps=fps, frames_per_chunk=frames, steps=steps)


@dataclass
class _Worker:
    id: str
    state: WorkerState
    memory_bytes: int
    started_s: float
    ready_s: float | None


class FakeCluster:
    """Workers and sessions; `view()` rebuilds a `ClusterView` from scratch."""

    def __init__(self, model: FakeLatencyModel | None = None, config: TurboConfig | None = None,
                 now_s: float = 0.0, memory_bytes: int = 70 * GB):
        self.model = model or FakeLatencyModel()
        self.config = config or TurboConfig()
        self.now_s = now_s
        self.memory_bytes = memory_bytes
        self.workers: dict[str, _Worker] = {}
        self.sessions: dict[str, SessionView] = {}
        self.migrating: dict[str, tuple[str, str]] = {}  # sid -> (src, dst), left in flight
        self._was_active: dict[str, bool] = {}  # migrating sid -> active before the move
        self.offloading: set[str] = set()  # offloads left in flight (still resident, not listed idle)
        self._next_worker = 0
        self._next_session = 0

    # -- building -----------------------------------------------------------------------
    def add_worker(self, state: WorkerState = WorkerState.READY, memory_bytes: int | None = None) -> str:
        wid = f"w{self._next_worker:03d}"
        self._next_worker += 1
        ready = self.now_s if state is WorkerState.READY else None
        self.workers[wid] = _Worker(wid, state, memory_bytes or self.memory_bytes, self.now_s, ready)
        return wid

    def add_session(self, worker: str | None = None, *, state: SessionState | None = None,
                    context: float = 0.0, arrival_s: float | None = None, spec_: SessionSpec | None = None,
                    since_s: float | None = None, last_migrated_s: float = float("-inf")) -> str:
        sid = f"s{self._next_session:05d}"
        self._next_session += 1
        sp = spec_ or spec()
        if state is None:
            state = SessionState.ACTIVE if worker else SessionState.QUEUED
        arrival = self.now_s if arrival_s is None else arrival_s
        self.sessions[sid] = SessionView(
            id=sid, spec=sp, state=state, worker=worker, context_frames=float(context),
            state_bytes=self.full_bytes(sp.model), arrival_s=arrival,
            last_change_s=arrival if since_s is None else since_s, last_migrated_s=last_migrated_s)
        return sid

    def full_bytes(self, shape: str) -> int:
        """A session's `state_bytes` as the controller reports it: at the full window."""
        return self.model.state_bytes(shape, self.model.shape(shape).window_frames)

    def set_session(self, sid: str, **changes) -> None:
        self.sessions[sid] = replace(self.sessions[sid], **changes)

    # -- the view -----------------------------------------------------------------------
    def view(self) -> ClusterView:
        groups: dict[str, dict] = {w: {} for w in self.workers}
        used = {w: 0 for w in self.workers}
        members: dict[str, set] = {w: set() for w in self.workers}
        for s in self.sessions.values():
            if s.worker is None or s.worker not in self.workers:
                continue
            members[s.worker].add(s.id)
            used[s.worker] += s.state_bytes
            if s.id in self.offloading:
                continue  # woken during its offload: not in the load until it is pending
            if s.state is SessionState.ACTIVE or (s.state is SessionState.MIGRATING and s.id in self.migrating
                                                   and self._was_active.get(s.id, True)):
                g = groups[s.worker].get(s.spec.compat_key)
                key = s.spec.compat_key
                groups[s.worker][key] = (g or GroupLoad(key, 0, 0.0)).plus(s.context_frames)
        for sid, (src, dst) in self.migrating.items():
            s = self.sessions[sid]
            members[dst].add(sid)
            used[dst] += s.state_bytes
        workers = {}
        for wid, w in self.workers.items():
            gs = tuple(groups[wid].values())
            workers[wid] = WorkerView(
                id=wid, state=w.state, memory_bytes=w.memory_bytes, used_bytes=used[wid],
                sessions=frozenset(members[wid]), groups=gs,
                load_ms=cycle_ms(gs, self.model, self.config.engine.max_batch),
                started_s=w.started_s, ready_s=w.ready_s)
        pending = tuple(sorted((s.id for s in self.sessions.values() if s.state is SessionState.QUEUED),
                               key=lambda i: (self.sessions[i].arrival_s, i)))
        idle = sorted((s.last_change_s, s.id) for s in self.sessions.values()
                      if s.state is SessionState.IDLE and s.worker is not None and s.id not in self.offloading)
        offloaded: dict = {}
        for t, sid in sorted((s.last_change_s, s.id) for s in self.sessions.values()
                             if s.state is SessionState.OFFLOADED):
            offloaded.setdefault(self.sessions[sid].spec.compat_key, {})[sid] = t
        return ClusterView(now_s=self.now_s, workers=MappingProxyType(workers),
                           sessions=MappingProxyType(dict(self.sessions)), pending=pending,
                           model=self.model, config=self.config,
                           idle_resident=MappingProxyType({sid: t for t, sid in idle}),
                           idle_offloaded=MappingProxyType(offloaded),
                           slo_groups=MappingProxyType(Counter(
                               (s.spec.compat_key, spec_slo_ms(self.config, s.spec))
                               for s in self.sessions.values())))

    # -- applying decisions -------------------------------------------------------------
    def apply(self, d: Decision, *, instant: bool = True) -> None:
        """Apply a decision as the controller would; with `instant=False` migrations stay
        in flight (session MIGRATING, load on the source) until `finish_migrations()`."""
        for p in d.placements:
            s = self.sessions[p.session_id]
            w = self.workers[p.worker_id]
            assert w.state is WorkerState.READY, f"placement onto {w.state} worker"
            self.set_session(p.session_id, worker=p.worker_id, state=SessionState.ACTIVE,
                             last_change_s=self.now_s)
        for m in d.migrations:
            s = self.sessions[m.session_id]
            assert s.worker == m.src and s.state in (SessionState.ACTIVE, SessionState.IDLE)
            if instant:
                self.set_session(m.session_id, worker=m.dst, last_migrated_s=self.now_s)
            else:
                self._was_active[m.session_id] = s.state is SessionState.ACTIVE
                self.migrating[m.session_id] = (m.src, m.dst)
                self.set_session(m.session_id, state=SessionState.MIGRATING)
        for sid in d.offloads:
            s = self.sessions[sid]
            assert s.state is SessionState.IDLE and s.worker is not None and sid not in self.offloading
            if instant:
                self.set_session(sid, worker=None, state=SessionState.OFFLOADED, last_change_s=self.now_s)
            else:
                self.offloading.add(sid)
        for p in d.prefetches:
            assert self.sessions[p.session_id].state is SessionState.OFFLOADED
            assert self.workers[p.worker_id].state is WorkerState.READY, "prefetch onto a worker that is not ready"
            self.set_session(p.session_id, worker=p.worker_id, state=SessionState.IDLE, last_change_s=self.now_s)
        for _ in range(d.scale_out):
            self.add_worker(WorkerState.STARTING)
        for wid in d.release:
            self.workers[wid].state = WorkerState.DRAINING
        for wid in d.cancel_release:
            assert self.workers[wid].state is WorkerState.DRAINING
            self.workers[wid].state = WorkerState.READY

    def finish_migrations(self) -> None:
        for sid, (src, dst) in self.migrating.items():
            state = SessionState.ACTIVE if self._was_active.get(sid, True) else SessionState.IDLE
            self.set_session(sid, worker=dst, state=state, last_migrated_s=self.now_s)
        self.migrating = {}

    def finish_offloads(self) -> None:
        for sid in self.offloading:
            woken = self.sessions[sid].state is SessionState.ACTIVE  # resumed during the offload
            self.set_session(sid, worker=None, state=SessionState.QUEUED if woken else SessionState.OFFLOADED,
                             last_change_s=self.now_s)
        self.offloading = set()

    def advance(self, to_s: float) -> None:
        """Move the clock: starting workers become ready, empty draining ones go."""
        self.now_s = to_s
        delay = self.config.cluster.startup_delay_s
        for w in list(self.workers.values()):
            if w.state is WorkerState.STARTING and w.started_s + delay <= to_s:
                w.state = WorkerState.READY
                w.ready_s = w.started_s + delay
            if w.state is WorkerState.DRAINING and not any(
                    s.worker == w.id for s in self.sessions.values()):
                del self.workers[w.id]

    def pause(self, sid: str) -> None:
        if sid in self.migrating:  # paused in transit: it lands idle, out of the source's load now
            self._was_active[sid] = False
            return
        self.set_session(sid, state=SessionState.IDLE, last_change_s=self.now_s)

    def resume(self, sid: str) -> None:
        s = self.sessions[sid]
        if s.worker is None:
            self.set_session(sid, state=SessionState.QUEUED, last_change_s=self.now_s)
        else:
            self.set_session(sid, state=SessionState.ACTIVE, last_change_s=self.now_s)

    def depart(self, sid: str) -> None:
        del self.sessions[sid]

    # -- checks -------------------------------------------------------------------------
    def count(self, *states: WorkerState) -> int:
        return sum(1 for w in self.workers.values() if w.state in states)

    def max_load(self) -> float:
        v = self.view()
        return max((w.load_ms for w in v.workers.values()), default=0.0)


def run_policy(policy, cluster: FakeCluster, memory=None, *, instant: bool = True):
    """One decision applied to the cluster; returns (decision, memory)."""
    mem = policy.initial_memory() if memory is None else memory
    d = policy.decide(cluster.view(), mem)
    cluster.apply(d, instant=instant)
    return d, d.memory


def full_state(model: FakeLatencyModel, name: str = "fake") -> int:
    return model.state_bytes(name, model.shape(name).window_frames)


def ceil_div(a: float, b: float) -> int:
    return math.ceil(a / b - 1e-9)


# -- random clusters for property tests ----------------------------------------------------

TWO_SHAPES = (fake_shape("fake"),
              fake_shape("big", per_session_ms=60.0, base_ms=40.0, state_per_frame_bytes=400 * 10**6))
SPECS = (spec("fake", steps=4), spec("fake", steps=2), spec("big", steps=4))


def random_cluster(draw, st, *, max_workers: int = 6, max_sessions: int = 10, max_pending: int = 6,
                   states: tuple[WorkerState, ...] = (WorkerState.READY,) * 4 + (WorkerState.STARTING, WorkerState.DRAINING),
                   config: TurboConfig | None = None, idle: bool = True) -> FakeCluster:
    """A cluster drawn with hypothesis' `draw` (pass `hypothesis.strategies` as `st`):
    workers in random states, resident sessions of three specs (two shapes, two step counts)
    that fit in memory, random contexts and ages, some idle, some recently migrated."""
    model = FakeLatencyModel(*TWO_SHAPES)
    mem = draw(st.sampled_from([6 * GB, 12 * GB, 30 * GB]))
    c = FakeCluster(model, config or TurboConfig(), now_s=1000.0, memory_bytes=mem)
    for _ in range(draw(st.integers(1, max_workers))):
        c.add_worker(draw(st.sampled_from(states)))
    used = {w: 0 for w in c.workers}
    for wid, w in c.workers.items():
        if w.state is WorkerState.STARTING:
            continue
        for _ in range(draw(st.integers(0, max_sessions))):
            sp = draw(st.sampled_from(SPECS))
            need = c.full_bytes(sp.model)
            if used[wid] + need > mem:
                break
            used[wid] += need
            state = SessionState.IDLE if idle and draw(st.integers(0, 4)) == 0 else SessionState.ACTIVE
            c.add_session(wid, state=state, spec_=sp, context=draw(st.sampled_from([0, 3, 9, 15, 21])),
                          arrival_s=draw(st.floats(0.0, 999.0)),
                          since_s=draw(st.floats(900.0, 1000.0)),
                          last_migrated_s=draw(st.sampled_from([float("-inf"), 995.0])))
    for _ in range(draw(st.integers(0, max_pending))):
        c.add_session(None, spec_=draw(st.sampled_from(SPECS)), context=draw(st.sampled_from([0, 21])),
                      arrival_s=draw(st.floats(990.0, 1000.0)))
    return c
