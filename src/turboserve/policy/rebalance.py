"""Rebalance: migrations that lower the bottleneck, drain releasing workers, Llumnix pairs.

In: a `ClusterView`, a `WhatIf` (placements of this call already applied) with its
`LoadOrder`, and the sessions already in transit. Out: `Migration`s, applied to the
what-if as they are chosen, so each move sees the previous ones.

Min-max rebalancing (TurboServe): the bottleneck is the worker with the highest predicted
load L. For a few of its active sessions (the oldest of each distinct (group, context,
state size): age is the best cheap predictor of a long remaining life under heavy-tailed
durations, and equal signatures give equal gains) and the `candidate_workers` least-loaded
feasible destinations (compatible ones: running the session's group, or none; see
`mixes`), `gain = L - max(L_src', L_dst') - eta * migration_cost_ms`. The best
move is applied while its gain exceeds `gain_threshold_ms`, up to `max_moves_per_decision`
(a group run in r rounds may move r equal sessions at once: see `rebalance_min_max`).
A positive gain means both ends of the move end below L, so the predicted maximum never
rises. While the bottleneck still meets the SLO, the moved session must not miss it
either: its first chunk on the destination waits for the downtime, for the round in
progress there (`dst_wait` times the destination's cycle; 1 = worst case) and for its own
round, and that sum must stay within the SLO; so moves then go to markedly lighter workers
(new ones after a scale-out, above all). Once the bottleneck misses the SLO on every chunk,
one late chunk of the moved session is the lesser harm, and only the gain decides.
Sessions migrated within `cooldown_s`, or in transit, are not moved.

Only sessions counted in their worker's active groups are candidates (`uncounted`): a
session woken while its offload is still under way is ACTIVE in the view but not in the
load (it becomes pending when the offload ends). When the view cannot tell which of a
worker's active sessions of one group is the uncounted one, none of that group moves from
that worker in this decision.

Migration cost (`migration_cost_ms`) is the expected downtime of a live migration: the
session keeps generating on the source while its state is pre-copied over the GPU link;
then it stops at a chunk boundary and only the state written meanwhile is copied. That
delta is the per-chunk part of the state (the VAE and latent caches, i.e. the state at
zero context, plus the KV frames one chunk appends) times the chunks generated during
pre-copy (at least one), capped at the whole state. Downtime = alpha-beta transfer time of
that delta (`policy.latency.transfer_ms`).

Draining (consolidation before scale-in): every active session of a DRAINING worker moves,
regardless of gain, to a feasible worker whose resulting load stays within the session's
SLO, a compatible one first, then the one where its first chunk comes soonest (downtime,
the round in progress there, its own round); with none, it waits (or pauses or ends: a
draining worker takes no new session). Holding drains to the stricter first-chunk bound of
rebalancing did worse in simulation on both cost and worst-case latency: GPUs stay rented
longer while new sessions crowd the others. Idle ones are offloaded (cheaper) or, without
offload, migrated by memory alone.

Pairwise (migrate-only, Llumnix-style): the most and the least loaded READY workers are
paired; the session whose move lowers the pair's maximum the most moves, if that lowers it
by more than `gain_threshold_ms`; repeated up to `max_moves_per_decision` per poll.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from ..types import CompatKey, SessionId, SessionState, WorkerId, WorkerState
from .latency import transfer_ms
from .load import GroupLoad
from .views import ClusterView, Migration, SessionView
from .whatif import LoadOrder, ModelCache, WhatIf, groups_minus, groups_plus


@dataclass(frozen=True)
class InFlight:
    """A migration this policy issued that has not finished yet."""

    session_id: SessionId
    src: WorkerId
    dst: WorkerId
    key: CompatKey
    context_frames: float
    active: bool


def migration_cost_ms(view: ClusterView, cache: ModelCache, s: SessionView, src_load_ms: float,
                      parallel: int = 1) -> float:
    """Expected downtime (ms) of migrating `s` live over the GPU link (see the module doc);
    `parallel` sessions like it moving together share the link, so each phase carries
    `parallel` times the bytes."""
    link = view.config.link("gpu")
    shape = s.spec.model
    info = cache.shape(shape)
    total = s.state_bytes or cache.state_bytes(shape, s.context_frames)
    precopy_ms = transfer_ms(parallel * total, link.alpha_ms, link.bandwidth_gbps)
    base = cache.state_bytes(shape, 0)
    full = cache.full_state_bytes(shape)
    per_frame = (full - base) / max(1, info.window_frames)
    per_chunk = base + per_frame * info.latent_frames_per_chunk
    chunks = max(1, math.ceil(precopy_ms / max(src_load_ms, 1e-3)))
    delta = min(total, int(per_chunk * chunks))
    return transfer_ms(parallel * delta, link.alpha_ms, link.bandwidth_gbps)


def in_flight_record(view: ClusterView, m: Migration) -> InFlight:
    """What to remember about a migration just decided, to count it until it commits."""
    s = view.sessions[m.session_id]
    return InFlight(m.session_id, m.src, m.dst, s.spec.compat_key, s.context_frames,
                    s.state is SessionState.ACTIVE)


def prune_in_flight(view: ClusterView, in_flight: tuple[InFlight, ...]) -> tuple[InFlight, ...]:
    """Keep the migrations still in transit (the session exists and is MIGRATING)."""
    keep = []
    for m in in_flight:
        s = view.sessions.get(m.session_id)
        if s is not None and s.state is SessionState.MIGRATING:
            keep.append(m)
    return tuple(keep) if len(keep) != len(in_flight) else in_flight


def apply_in_flight(view: ClusterView, whatif: WhatIf, in_flight: tuple[InFlight, ...]) -> None:
    """Count in-transit sessions' load at their destination, so that decisions made while
    they move see where they are going (the view keeps the load on the source until the
    move commits; the destination's memory is already reserved in its `used_bytes`).
    A session paused while in transit leaves its source's group in the view but not this
    record (a MIGRATING session does not say whether it is paused), so at most as many
    moves per source group are counted as the group holds beyond its ACTIVE sessions."""
    left: dict[tuple[WorkerId, CompatKey], int] = {}
    for m in in_flight:
        s = view.sessions.get(m.session_id)
        if s is None or s.worker != m.src or not m.active:
            continue
        if m.src not in view.workers or m.dst not in view.workers:
            continue
        k = (m.src, m.key)
        n = left.get(k)
        if n is None:
            n = _in_transit_counted(view, m.src, m.key)
        if n <= 0:
            left[k] = 0
            continue  # the view no longer counts it on the source
        left[k] = n - 1
        whatif.move(m.src, m.dst, m.key, m.context_frames, 0, active=True)


def _in_transit_counted(view: ClusterView, wid: WorkerId, key: CompatKey) -> int:
    """Sessions of `key` the view counts on `wid` beyond its ACTIVE ones: those in transit."""
    batch = next((g.batch for g in view.workers[wid].groups if g.key == key), 0)
    return batch - len(_active_by_key(view, wid).get(key, ())) if batch > 0 else 0


def _active_by_key(view: ClusterView, wid: WorkerId) -> dict[CompatKey, list[SessionId]]:
    """The ACTIVE sessions resident on `wid`, by group."""
    out: dict[CompatKey, list[SessionId]] = {}
    for sid in view.workers[wid].sessions:
        s = view.sessions.get(sid)
        if s is not None and s.worker == wid and s.state is SessionState.ACTIVE:
            out.setdefault(s.spec.compat_key, []).append(sid)
    return out


def uncounted(view: ClusterView, wid: WorkerId,
              offloading: frozenset[SessionId] | set[SessionId] = frozenset()
              ) -> tuple[set[CompatKey], set[SessionId]]:
    """What must not move off `wid` as an active session: (groups whose active sessions in
    the view outnumber the group's batch with no way to tell which one is not counted,
    sessions known not to be counted). `offloading` are the offloads this policy issued
    that are still under way: an ACTIVE one among them was woken during its offload."""
    batch = {g.key: g.batch for g in view.workers[wid].groups}
    known: set[SessionId] = set()
    skip_keys = set()
    for key, sids in _active_by_key(view, wid).items():
        woken = [sid for sid in sids if sid in offloading]
        known.update(woken)
        if len(sids) - len(woken) > batch.get(key, 0):
            skip_keys.add(key)
    return skip_keys, known


def _counted(s: SessionView, skip: tuple[set[CompatKey], set[SessionId]]) -> bool:
    return s.id not in skip[1] and s.spec.compat_key not in skip[0]


def _cooling(view: ClusterView, s: SessionView) -> bool:
    return view.now_s - s.last_migrated_s < view.config.rebalance.cooldown_s


def movable_sessions(view: ClusterView, wid: WorkerId, busy: set[SessionId],
             skip: tuple[set[CompatKey], set[SessionId]]) -> Iterator[SessionView]:
    """The active sessions of `wid` a move may take: not busy with another operation, not
    moved within the cool-down, and counted in the worker's load (`uncounted` -> `skip`)."""
    for sid in view.workers[wid].sessions:
        if sid in busy:
            continue
        s = view.sessions.get(sid)
        if s is None or s.worker != wid or s.state is not SessionState.ACTIVE or _cooling(view, s):
            continue
        if _counted(s, skip):
            yield s


def _candidates(view: ClusterView, wid: WorkerId, busy: set[SessionId], limit: int,
                offloading: frozenset[SessionId] = frozenset()) -> list[list[SessionView]]:
    """Active, movable sessions of `wid` grouped by (group, context, bytes): sessions with
    equal signatures give equal gains. Each list is oldest first; lists are ordered by
    their oldest session; at most `limit` lists. Independent of set iteration order."""
    by_sig: dict[tuple, list[SessionView]] = {}
    for s in movable_sessions(view, wid, busy, uncounted(view, wid, offloading)):
        by_sig.setdefault((s.spec.compat_key, s.context_frames, s.state_bytes), []).append(s)
    lists = [sorted(v, key=lambda s: (s.arrival_s, s.id)) for v in by_sig.values()]
    lists.sort(key=lambda v: (v[0].arrival_s, v[0].id))
    return lists[:limit]


def _minus_k(whatif: WhatIf, wid: WorkerId, key: CompatKey, ctx: float, k: int) -> float:
    groups = whatif.groups(wid)
    for _ in range(k):
        groups = groups_minus(groups, key, ctx)
    return whatif.cache.cycle_ms(groups)


def _plus_k(whatif: WhatIf, wid: WorkerId, key: CompatKey, ctx: float, k: int) -> float:
    groups = whatif.groups(wid)
    for _ in range(k):
        groups = groups_plus(groups, key, ctx)
    return whatif.cache.cycle_ms(groups)


def _source_could_pay(whatif: WhatIf, src: WorkerId, peak: float, kmax: int, min_cost_ms: float,
                      threshold_ms: float) -> bool:
    """Whether some move of up to `kmax` sessions of one group off `src` could pass the
    source-side test of `rebalance_min_max` (`peak - src_after - cost > threshold`), judged
    from the worker's groups alone: most decisions move nothing, and listing the
    bottleneck's sessions to find that out is most of their cost. Each removed session takes
    at most its shape's window of context, round times never fall with context (the model's
    `round_ms_monotone`; without it, True), and a move costs at least `min_cost_ms`. Exact:
    False only when every candidate would fail the test."""
    cache = whatif.cache
    if not cache.monotone:
        return True
    groups = whatif.groups(src)
    total = cache.cycle_ms(groups)
    max_batch = cache.max_batch
    for g in groups:
        cmax = cache.shape(g.key.model).window_frames
        rest = total - cache.group_ms(g)
        rounds = -(-g.batch // max_batch)
        for k in range(1, min(g.batch, rounds, kmax) + 1):
            left = g.batch - k
            after = rest + (cache.group_ms(GroupLoad(g.key, left, max(0.0, g.context_sum - k * cmax)))
                            if left > 0 else 0.0)
            # the margin covers summation-order rounding against `_minus_k`
            if peak - after - min_cost_ms > threshold_ms - 1e-6:
                return True
    return False


def _destinations(whatif: WhatIf, order: LoadOrder, ready: set[WorkerId], exclude: WorkerId,
                  key: CompatKey, need: int, limit: int, apart: bool = False) -> list[WorkerId]:
    """The `limit` least-loaded READY workers with room for `need` bytes of `key`;
    `apart`: only those that hold `key`'s group or no active group (see `mixes`)."""
    headroom = whatif.view.config.placement.memory_headroom
    out = []
    for _, _, wid in order.ascending():
        if wid == exclude or wid not in ready:
            continue
        if apart and mixes(whatif, wid, key):
            continue
        if whatif.fits(wid, key, need, headroom):
            out.append(wid)
            if len(out) >= limit:
                break
    return out


def mixes(whatif: WhatIf, wid: WorkerId, key: CompatKey) -> bool:
    """Whether one more active session of `key` on `wid` would start a group beside other
    groups. Each group runs its own round, and a round costs far more than one more
    session in it (demo91 at 4 steps: 93 ms alone, +2.5 ms per session), so a worker
    holding two groups serves fewer sessions than one holding either; the gain of such a
    move is short-lived, the capacity it costs is not."""
    groups = whatif.groups(wid)
    return bool(groups) and all(g.key != key for g in groups)


def rebalance_min_max(view: ClusterView, whatif: WhatIf, order: LoadOrder, ready: set[WorkerId],
                      busy: set[SessionId], budget: int,
                      offloading: frozenset[SessionId] = frozenset(),
                      source_bound: bool = True) -> list[Migration]:
    """TurboServe's min-max moves off the bottleneck; `busy` (sessions in transit or
    already moved in this call) grows with each move; `offloading`: offloads under way;
    `source_bound`: skip listing the bottleneck's sessions when `_source_could_pay` says
    none could move (the same moves, faster; False is the reference for tests).

    A group split into r rounds (batch > max_batch) only gets faster once r sessions leave
    (the per-round batch is ceil(batch / r)), so up to r equal sessions may move together
    to one destination, paying the downtime of r transfers sharing the link."""
    cfg = view.config.rebalance
    cache = whatif.cache
    max_batch = cache.max_batch
    moves: list[Migration] = []
    # every move's cost is at least eta times the link's latency (`migration_cost_ms`)
    min_cost_ms = cfg.eta * view.config.link("gpu").alpha_ms if source_bound and cfg.eta >= 0 else None
    while len(moves) < budget:
        top = order.top()
        if top is None:
            break
        peak, _, src = top
        if peak <= 0.0 or view.workers[src].state is WorkerState.STARTING:
            break
        if min_cost_ms is not None and not _source_could_pay(whatif, src, peak, budget - len(moves),
                                                             min_cost_ms, cfg.gain_threshold_ms):
            break
        best = None  # (score, sessions, destination)
        for same in _candidates(view, src, busy, cfg.candidate_sessions, offloading):
            s = same[0]
            key = s.spec.compat_key
            ctx = s.context_frames
            g = whatif.group(src, key)
            if g is None:
                continue  # not in the load there (cannot happen for counted sessions)
            rounds = -(-g.batch // max_batch) if g is not None else 1
            need = cache.full_state_bytes(key.model)
            slo = view.slo_ms(s.spec)
            for k in range(1, min(len(same), g.batch, rounds, budget - len(moves)) + 1):
                src_after = _minus_k(whatif, src, key, ctx, k)
                downtime = migration_cost_ms(view, cache, s, peak, parallel=k)
                cost = cfg.eta * downtime
                if peak - src_after - cost <= cfg.gain_threshold_ms:
                    continue  # even a free destination could not pay for the move
                for dst in _destinations(whatif, order, ready, src, key, need * k, cfg.candidate_workers,
                                         apart=True):
                    dst_after = _plus_k(whatif, dst, key, ctx, k)
                    # The moved session's first chunk there: downtime, the round in
                    # progress, then its own. While the bottleneck meets the SLO, a move
                    # must not make that one chunk late.
                    if peak <= slo and downtime + cfg.dst_wait * whatif.load(dst) + dst_after > slo:
                        continue
                    gain = peak - max(src_after, dst_after) - cost
                    # Equal gains (the source side dominates) go to the lighter destination,
                    # then to fewer moves, then to older sessions.
                    score = (gain, -dst_after, -k, -s.arrival_s, -order.order_of(dst))
                    if best is None or score > best[0]:
                        best = (score, same[:k], dst)
        if best is None or best[0][0] <= cfg.gain_threshold_ms:
            break
        gain, chosen, dst = best[0][0], best[1], best[2]
        for s in chosen:
            whatif.move(src, dst, s.spec.compat_key, s.context_frames, s.state_bytes, active=True)
            busy.add(s.id)
            moves.append(Migration(s.id, src, dst, predicted_gain_ms=gain))
    return moves


def drain_moves(view: ClusterView, whatif: WhatIf, order: LoadOrder, ready: set[WorkerId],
                draining: list[WorkerId], busy: set[SessionId], budget: int,
                offload_idle: bool, offloading: frozenset[SessionId] = frozenset()
                ) -> tuple[list[Migration], list[SessionId]]:
    """Empty DRAINING workers: migrate active sessions where the SLO still holds, offload
    (or, without offload, migrate) idle ones. Returns (migrations, offloads). Sessions not
    counted in the worker's load (`uncounted`) and idle ones not listed as idle-resident
    (their offload or migration is under way) are left alone: they are leaving already."""
    cfg = view.config
    cache = whatif.cache
    moves: list[Migration] = []
    offloads: list[SessionId] = []
    for wid in draining:
        skip = uncounted(view, wid, offloading)
        for sid in sorted(view.workers[wid].sessions):
            if len(moves) >= budget:
                return moves, offloads
            if sid in busy:
                continue
            s = view.sessions.get(sid)
            if s is None or s.worker != wid:
                continue
            if s.state is SessionState.IDLE and sid not in view.idle_resident:
                continue
            if s.state is SessionState.ACTIVE and not _counted(s, skip):
                continue
            if s.state is SessionState.IDLE and offload_idle:
                offloads.append(sid)
                busy.add(sid)
                continue
            if s.state is not SessionState.ACTIVE and s.state is not SessionState.IDLE:
                continue
            active = s.state is SessionState.ACTIVE
            key = s.spec.compat_key
            need = cache.full_state_bytes(key.model)
            best = None
            downtime = migration_cost_ms(view, cache, s, whatif.load(wid)) if active else 0.0
            for dst in _destinations(whatif, order, ready, wid, key, need, cfg.rebalance.candidate_workers):
                if not active:
                    score = (False, whatif.load(dst), whatif.load(dst))
                else:
                    after = whatif.load_with(dst, key, s.context_frames)
                    first = downtime + cfg.rebalance.dst_wait * whatif.load(dst) + after
                    if after > view.slo_ms(s.spec):
                        continue  # would miss the SLO there: wait (or let it pause or end)
                    score = (mixes(whatif, dst, key), first, after)  # beside its own group first
                if best is None or score < best[0]:
                    best = (score, dst)
            if best is None:
                continue
            whatif.move(wid, best[1], key, s.context_frames, s.state_bytes, active=active)
            busy.add(sid)
            moves.append(Migration(sid, wid, best[1]))
    return moves, offloads


def pairwise_balance(view: ClusterView, whatif: WhatIf, order: LoadOrder, ready: set[WorkerId],
                     busy: set[SessionId], budget: int) -> list[Migration]:
    """Llumnix-style: move one session from the most to the least loaded READY worker when
    the what-if says the pair's maximum drops by more than the threshold; repeat."""
    cfg = view.config.rebalance
    moves: list[Migration] = []
    for _ in range(budget):
        src = dst = None
        for _, _, wid in order.descending():
            if wid in ready:
                src = wid
                break
        for _, _, wid in order.ascending():
            if wid in ready:
                dst = wid
                break
        if src is None or dst is None or src == dst:
            break
        pair_max = whatif.load(src)
        need_cache: dict[CompatKey, bool] = {}
        best = None  # (pair max after, bytes, id, session)
        for s in movable_sessions(view, src, busy, uncounted(view, src)):
            key = s.spec.compat_key
            fits = need_cache.get(key)
            if fits is None:
                need = whatif.cache.full_state_bytes(key.model)
                fits = need_cache[key] = whatif.fits(dst, key, need, view.config.placement.memory_headroom)
            if not fits:
                continue
            after = max(whatif.load_without(src, key, s.context_frames),
                        whatif.load_with(dst, key, s.context_frames))
            score = (after, s.state_bytes, s.id)
            if best is None or score < best[0]:
                best = (score, s)
        if best is None or pair_max - best[0][0] <= cfg.gain_threshold_ms:
            break
        s = best[1]
        whatif.move(src, dst, s.spec.compat_key, s.context_frames, s.state_bytes, active=True)
        busy.add(s.id)
        moves.append(Migration(s.id, src, dst, predicted_gain_ms=pair_max - best[0][0]))
    return moves
