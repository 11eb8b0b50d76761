"""Offload: idle sessions' state leaves the GPU for host memory.

In: the view's `idle_resident` (idle sessions on a GPU -> idle since, oldest first) and
`idle_offloaded` (idle sessions in host memory), the sessions whose offload this policy
already asked for, and, under memory pressure, the pending sessions that found no feasible
worker. Out: session ids to offload, and sessions to prefetch back onto a GPU.

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
  resulting load; among equal loads, the worker whose victims have been idle longest (idle
  periods are heavy-tailed: the longer a session has been idle, the less likely it resumes
  soon). Offloads already in flight count as room that is coming, so one pending session
  never triggers two rounds of offloads.
- Prefetch: an idle session that pressure evicted although no restore meets its SLO goes
  back to a GPU with room before it resumes (`held_prefetches`), while no session waits for
  a GPU and a few workers with room stay free for arrivals.
Resuming needs nothing here: a resumed session is pending and is placed like a new one,
which makes every resume a free rebalancing point.
"""

from __future__ import annotations

from typing import Callable

from ..types import CompatKey, SessionId, SessionState, WorkerId
from .latency import transfer_ms
from .load import GroupLoad
from .views import ClusterView, Placement
from .whatif import LoadOrder, ModelCache, WhatIf


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
    given its next chunk alone on a GPU within `slo_ms` (memoised in the cache)."""
    link = view.config.link("host")
    memo = (key, slo_ms, link.alpha_ms, link.bandwidth_gbps)
    ok = cache.resume_ok.get(memo)
    if ok is None:
        window = cache.shape(key.model).window_frames
        restore = transfer_ms(cache.full_state_bytes(key.model), link.alpha_ms, link.bandwidth_gbps)
        ok = cache.resume_ok[memo] = restore + cache.group_ms(GroupLoad(key, 1, float(window))) <= slo_ms
    return ok


def grace_offloads(view: ClusterView, skip: set[SessionId] | frozenset[SessionId],
                   cache: ModelCache) -> list[SessionId]:
    """Idle sessions past their grace period whose resume can meet the SLO, oldest first."""
    deadline = view.now_s - view.config.offload.grace_s
    out: list[SessionId] = []
    for sid, since in view.idle_resident.items():
        if since > deadline:
            break  # oldest first: everything after is younger
        if sid in skip:
            continue
        s = view.sessions.get(sid)
        if s is None or s.state is not SessionState.IDLE or s.worker is None:
            continue
        if resume_meets_slo(view, cache, s.spec.compat_key, view.slo_ms(s.spec)):
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
    idle_since = view.idle_resident
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
            # among equal loads and bytes, the worker whose victims have been idle longest:
            # the longer a session has been idle, the less likely it resumes soon
            youngest = idle_since[victims[-1]] if victims else float("-inf")
            score = (whatif.load_with(wid, key, s.context_frames), freed, youngest, i)
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


def held_prefetches(view: ClusterView, whatif: WhatIf, order: Callable[[], LoadOrder],
                    ready: set[WorkerId], skip: set[WorkerId], keep_free: int,
                    limit: int) -> list[Placement]:
    """Idle sessions in host memory whose resume could not meet the SLO (`resume_meets_slo`
    false: they left their GPU only under pressure), put back on a GPU that has room for
    them, so that their first chunk back does not wait for the restore.

    Most recently offloaded first (the likeliest to resume soon), least loaded workers first,
    one per worker per call, at most `limit`; the last `keep_free` workers with room for
    such a session are left free for arrivals, which would otherwise have to evict one
    again. Workers in `skip` (being released) are not used. The prefetched session is idle
    resident again, so pressure can still evict it. Applied to `whatif` as made. `order`
    builds the load order; it is called only when some key has sessions to bring back."""
    if limit <= 0 or not view.idle_offloaded or not ready:
        return []
    cache = whatif.cache
    headroom = view.config.placement.memory_headroom
    out: list[Placement] = []
    for key, offloaded in view.idle_offloaded.items():
        if not offloaded:
            continue
        first = view.sessions.get(next(iter(offloaded)))
        if first is None or resume_meets_slo(view, cache, key, view.slo_ms(first.spec)):
            continue
        need = cache.full_state_bytes(key.model)
        room = [wid for _, _, wid in order().ascending()
                if wid in ready and wid not in skip and whatif.fits(wid, key, need, headroom)]
        room = room[:max(0, len(room) - keep_free)]
        for sid, wid in zip(reversed(offloaded), room):
            if len(out) >= limit:
                return out
            s = view.sessions.get(sid)
            if s is None:
                continue
            whatif.add(wid, key, s.context_frames, need, active=False)
            out.append(Placement(sid, wid))
    return out
