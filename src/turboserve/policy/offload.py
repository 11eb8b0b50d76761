"""Offload: idle sessions' state leaves the GPU for host memory.

In: the view's `idle_resident` (idle sessions on a GPU -> idle since, oldest first), the
sessions whose offload this policy already asked for, and, under memory pressure, the
pending sessions that found no feasible worker. Out: session ids to offload.

- Grace: an idle session idle for longer than `offload.grace_s` is offloaded. The index is
  oldest first, so the scan stops at the first session still within its grace period. The
  grace is short (0.5 s) for latency, not memory: a session that wakes up on its GPU waits
  for the round in progress there, up to a whole cycle; woken from host memory it is placed
  like a new session, on the worker whose next round starts soonest.
  Not a session whose first chunk back could not meet its SLO after the restore (restore
  over the host link + a round alone > SLO: a wan14b-480p session, 27 GB over PCIe, ~1.1 s
  before a ~2 s round at a 2.6 s SLO): the chunk that resumes it would be late whatever
  happens, so such a session leaves the GPU only under pressure, and the autoscaler keeps
  a GPU for it (`ClusterScan.held_gpus`).
- Pressure: when a pending session has no feasible worker, idle sessions are offloaded at
  once, oldest first, on the READY worker where that makes room for it with the lowest
  resulting load. Offloads already in flight count as room that is coming, so one pending
  session never triggers two rounds of offloads.
Resuming needs nothing here: a resumed session is pending and is placed like a new one,
which makes every resume a free rebalancing point.
"""

from __future__ import annotations

from ..types import CompatKey, SessionId, SessionState, WorkerId
from .latency import transfer_ms
from .load import GroupLoad
from .views import ClusterView
from .whatif import ModelCache, WhatIf


def prune_offloading(view: ClusterView, offloading: frozenset[SessionId]) -> frozenset[SessionId]:
    """Keep the offloads still in flight. The controller takes a session out of
    `idle_resident` when its offload begins and clears its worker when it ends; a session
    still listed there was never started (refused), so it is forgotten and may be retried."""
    if not offloading:
        return offloading
    keep = frozenset(sid for sid in offloading
                     if (s := view.sessions.get(sid)) is not None and s.worker is not None
                     and sid not in view.idle_resident)
    return keep if len(keep) != len(offloading) else offloading


def resume_meets_slo(view: ClusterView, cache: ModelCache, key: CompatKey, slo_ms: float) -> bool:
    """Whether a session of this group, offloaded with a full window, can be restored and
    given its next chunk alone on a GPU within `slo_ms`."""
    window = cache.shape(key.model).window_frames
    link = view.config.link("host")
    restore = transfer_ms(cache.full_state_bytes(key.model), link.alpha_ms, link.bandwidth_gbps)
    return restore + cache.group_ms(GroupLoad(key, 1, float(window))) <= slo_ms


def grace_offloads(view: ClusterView, skip: set[SessionId] | frozenset[SessionId],
                   cache: ModelCache) -> list[SessionId]:
    """Idle sessions past their grace period whose resume can meet the SLO, oldest first."""
    deadline = view.now_s - view.config.offload.grace_s
    out: list[SessionId] = []
    fits: dict[CompatKey, bool] = {}
    for sid, since in view.idle_resident.items():
        if since > deadline:
            break  # oldest first: everything after is younger
        if sid in skip:
            continue
        s = view.sessions.get(sid)
        if s is None or s.state is not SessionState.IDLE or s.worker is None:
            continue
        key = s.spec.compat_key
        ok = fits.get(key)
        if ok is None:
            ok = fits[key] = resume_meets_slo(view, cache, key, view.slo_ms(s.spec))
        if ok:
            out.append(sid)
    return out


def pressure_offloads(view: ClusterView, whatif: WhatIf, ready: set[WorkerId],
                      unplaced: list[SessionId], in_flight: set[SessionId] | frozenset[SessionId],
                      limit: int = 8) -> tuple[list[SessionId], list[SessionId]]:
    """Offloads that make room for unplaced pending sessions (up to `limit` of them).

    Returns (offloads, sessions still without any possible room: not even offloading every
    idle session of a READY worker would fit them)."""
    if not unplaced:
        return [], []
    cache = whatif.cache
    headroom = view.config.placement.memory_headroom
    # Bytes already being freed (offloads in flight or decided in this call), and the idle
    # sessions of READY workers that could still go, oldest first.
    coming: dict[WorkerId, int] = {}
    for sid in in_flight:
        s = view.sessions.get(sid)
        if s is not None and s.worker in ready:
            coming[s.worker] = coming.get(s.worker, 0) + s.state_bytes
    idle_by_worker: dict[WorkerId, list[tuple[SessionId, int]]] = {}
    for sid in view.idle_resident:
        if sid in in_flight:
            continue
        s = view.sessions.get(sid)
        if s is not None and s.worker in ready and s.state is SessionState.IDLE:
            idle_by_worker.setdefault(s.worker, []).append((sid, s.state_bytes))
    offloads: list[SessionId] = []
    hopeless: list[SessionId] = []
    for sid in unplaced[:limit]:
        s = view.sessions.get(sid)
        if s is None:
            continue
        key = s.spec.compat_key
        need = cache.full_state_bytes(key.model)
        best = None  # (resulting load, bytes to free, worker order, worker, victims)
        waiting = False
        for i, wid in enumerate(view.workers):
            if wid not in ready:
                continue
            w = view.workers[wid]
            room = (w.memory_bytes - whatif.used_bytes(wid) - int(headroom * w.memory_bytes)
                    - whatif.activation_need(wid, key) + coming.get(wid, 0))
            if room >= need:
                waiting = True  # an offload in flight will make room: wait for it
                break
            victims: list[SessionId] = []
            freed = 0
            for vid, nbytes in idle_by_worker.get(wid, ()):
                if room + freed >= need:
                    break
                victims.append(vid)
                freed += nbytes
            if room + freed < need:
                continue
            score = (whatif.load_with(wid, key, s.context_frames), freed, i)
            if best is None or score < best[0]:
                best = (score, wid, victims)
        if waiting:
            continue
        if best is None:
            hopeless.append(sid)
            continue
        _, wid, victims = best
        offloads.extend(victims)
        gone = set(victims)
        freed = sum(b for v, b in idle_by_worker.get(wid, ()) if v in gone)
        idle_by_worker[wid] = [(v, b) for v, b in idle_by_worker.get(wid, ()) if v not in gone]
        # The room is now reserved for `sid`: later pending sessions must not count on it.
        coming[wid] = coming.get(wid, 0) + freed - need
    return offloads, hopeless
