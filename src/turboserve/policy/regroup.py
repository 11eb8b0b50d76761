"""Regroup: empty a worker of one of the coalescing groups it holds, so it runs one round.

In: a `ClusterView`, a `WhatIf` (this call's placements and moves already applied) with
its `LoadOrder`, the workers that may hold several groups, the sessions busy elsewhere.
Out: `Migration`s, applied to the what-if as they are chosen.

Why: each group on a worker runs a round of its own, and a round costs far more than one
more session in it (demo91 at 4 steps: 93 ms alone, +2.5 ms per session). Placement keeps
groups apart while it can (`placement.MinMaxChooser`), but min-max spreads each group over
every worker where it fits, so one group can hold most workers lightly while the other's
few workers fill up. When the full group's sessions then go beside the other group
(demo91 at 32 GPUs, a burst of 2-step arrivals onto 7 full 2-step workers and 20 4-step
workers at 8 sessions each), one-session moves cannot undo it: moving one session of a
group that keeps others there saves one session's cost, not the round. Regrouping moves
*every* session of one group off such a worker at once, to workers running that group (or
none), turning the worker over to the other group.

A regroup of group G off worker W is applied when: every session G counts on W is active
and movable (not in transit, not cooling down after a migration, counted in W's load:
`rebalance.movable_sessions`); each finds a destination (READY, not W, with memory, running G
already or nothing) whose resulting cycle stays below W's cycle now and within
`rebalance.regroup_fill` of the session's SLO, its first chunk there included (downtime,
the round in progress, its own round); and `W's cycle - max(W's cycle after, the
destinations' cycles after) - eta * downtime` exceeds `rebalance.gain_threshold_ms`.
Downtime counts the sessions sharing the source's link. Each session goes to the
destination ending lightest among the `rebalance.candidate_workers` least-loaded ones that
qualify. The group with the fewest sessions that can go is moved.

Where no group can leave W so (a sustained peak at the ceiling leaves every worker of each
group full, and mixed), W swaps with another worker holding the same two groups: W keeps
one group and takes the partner's sessions of it, the partner takes the other
(`_best_swap`). Without swaps such a peak stayed mixed: a 2/4-step trace at 16 GPUs fell
from 99.86% to 87% SLO attainment with one-way regrouping, and reached 99.96% with swaps.

At most `rebalance.regroup_max_sessions` sessions move per decision, beside the min-max
budget. Every destination ends below the source's cycle (a swap: both end below the pair's
maximum), so the predicted maximum never rises; a session only goes where its group runs
or nothing runs, so no move mixes groups (no ping-pong with placement's or rebalancing's
rules). A worker holding one group is never touched: on traces with one group this does
nothing.
"""

from __future__ import annotations

from typing import Iterable

from ..types import SessionId, WorkerId
from .load import GroupLoad
from .rebalance import migration_cost_ms, mixes, movable_sessions, uncounted
from .views import ClusterView, Migration, SessionView
from .whatif import LoadOrder, WhatIf, groups_plus

MAX_SOURCES = 8  # mixed workers judged per decision, heaviest first
MAX_PARTNERS = 16  # mixed workers a swap is sought among, lightest first


def regroup_moves(view: ClusterView, whatif: WhatIf, order: LoadOrder, ready: set[WorkerId],
                  candidates: Iterable[WorkerId], busy: set[SessionId],
                  offloading: frozenset[SessionId] = frozenset()) -> list[Migration]:
    """Regroup moves off `candidates` (workers that may hold several groups; the others are
    skipped at the cost of one look), heaviest first; `busy` grows with each move."""
    cfg = view.config.rebalance
    budget = cfg.regroup_max_sessions
    mixed = sorted({w for w in candidates if w in ready and len(whatif.groups(w)) > 1},
                   key=lambda w: (-whatif.load(w), order.order_of(w)))
    # Bounded work per decision however many workers are mixed (a sustained peak at the
    # ceiling can mix them all): the heaviest few are judged, swaps are sought among the
    # lightest few, and the rest wait for the next decision (every event brings one).
    partners = mixed[::-1][:MAX_PARTNERS]
    moves: list[Migration] = []
    movable = _Movable(view, busy, offloading)
    for wid in mixed[:MAX_SOURCES]:
        if budget - len(moves) < 1 or len(whatif.groups(wid)) < 2:
            continue
        plan = _best_regroup(view, whatif, order, ready, wid, movable, budget - len(moves))
        if plan is None:
            plan = _best_swap(view, whatif, order, wid, partners, movable, budget - len(moves))
        if plan is None:
            continue
        gain, chosen = plan
        for s, dst in chosen:
            src = s.worker
            whatif.move(src, dst, s.spec.compat_key, s.context_frames, s.state_bytes, active=True)
            busy.add(s.id)
            movable.forget(src, dst)
            moves.append(Migration(s.id, src, dst, predicted_gain_ms=gain))
    return moves


class _Movable:
    """The movable active sessions of a worker, by group (`rebalance.movable_sessions`),
    listed once per call and again only for workers a move touched."""

    def __init__(self, view: ClusterView, busy: set[SessionId], offloading: frozenset[SessionId]):
        self.view, self.busy, self.offloading = view, busy, offloading
        self._memo: dict[WorkerId, dict] = {}

    def of(self, wid: WorkerId) -> dict:
        out = self._memo.get(wid)
        if out is None:
            out = self._memo[wid] = {}
            for s in movable_sessions(self.view, wid, self.busy, uncounted(self.view, wid, self.offloading)):
                out.setdefault(s.spec.compat_key, []).append(s)
        return out

    def forget(self, *wids: WorkerId) -> None:
        for w in wids:
            self._memo.pop(w, None)


def _best_swap(view: ClusterView, whatif: WhatIf, order: LoadOrder, wid: WorkerId, partners: list[WorkerId],
               movable: _Movable, budget: int) -> tuple[float, list[tuple[SessionView, WorkerId]]] | None:
    """Where no group can leave `wid` alone (every compatible worker is full, as when a
    sustained peak at the ceiling has mixed them all), a swap with one of `partners` holding
    the same two groups: `wid` keeps one group and takes the partner's sessions of it, the
    partner takes the other. Applied when both end within `regroup_fill` of the SLO and
    `max(load) - max(load after) - eta * downtime` exceeds the gain threshold; the swap
    ending lightest wins, then the one moving fewer sessions, then provisioning order.
    (gain, [(session, destination)]) or None."""
    cfg = view.config.rebalance
    cache = whatif.cache
    groups = whatif.groups(wid)
    if len(groups) != 2:
        return None
    mine = movable.of(wid)
    if any(len(mine.get(g.key, ())) != g.batch for g in groups):
        return None
    fill_ms = cfg.regroup_fill * min(view.slo_ms(mine[g.key][0].spec) for g in groups)
    keys = {g.key for g in groups}
    load = whatif.load(wid)
    swaps = []  # (max after, sessions moved, partner's order, partner, kept group, given group)
    for other in partners:
        theirs_groups = whatif.groups(other)
        if other == wid or len(theirs_groups) != 2 or {g.key for g in theirs_groups} != keys:
            continue
        for keep in groups:  # `wid` keeps `keep`'s group; the partner keeps the other
            give = next(g for g in groups if g.key != keep.key)
            n = give.batch + next(g.batch for g in theirs_groups if g.key == keep.key)
            if n > budget:
                continue
            after = max(cache.cycle_ms(_merged(keep, theirs_groups)), cache.cycle_ms(_merged(give, groups)))
            if after <= fill_ms and max(load, whatif.load(other)) - after > cfg.gain_threshold_ms:
                swaps.append((after, n, order.order_of(other), other, keep, give))
    # the costlier checks (movable sessions, downtime, memory) only for the best ones
    for after, _, _, other, keep, give in sorted(swaps, key=lambda x: x[:3]):
        theirs = movable.of(other)
        if any(len(theirs.get(g.key, ())) != g.batch for g in whatif.groups(other)):
            continue
        incoming, outgoing = theirs[keep.key], mine[give.key]
        peak = max(load, whatif.load(other))
        downtime = max(migration_cost_ms(view, cache, s, peak, parallel=max(len(incoming), len(outgoing)))
                       for s in incoming + outgoing)
        gain = peak - after - cfg.eta * downtime
        if gain <= cfg.gain_threshold_ms:
            continue
        if _fit_all(whatif, other, give.key, outgoing) and _fit_all(whatif, wid, keep.key, incoming):
            return gain, [(s, other) for s in outgoing] + [(s, wid) for s in incoming]
    return None


def _fit_all(whatif: WhatIf, wid: WorkerId, key, sessions: list[SessionView]) -> bool:
    """Room on `wid` for all of `sessions` at their full window, beside what it holds
    (the sessions leaving it hold their memory until their moves commit)."""
    need = sum(whatif.cache.full_state_bytes(s.spec.model) for s in sessions)
    return whatif.fits(wid, key, need, whatif.view.config.placement.memory_headroom)


def _merged(g: GroupLoad, groups: tuple[GroupLoad, ...]) -> tuple[GroupLoad]:
    """`g`'s sessions joined with those of its group in `groups`, as one group."""
    other = next(x for x in groups if x.key == g.key)
    return (GroupLoad(g.key, g.batch + other.batch, g.context_sum + other.context_sum),)


def _best_regroup(view: ClusterView, whatif: WhatIf, order: LoadOrder, ready: set[WorkerId],
                  wid: WorkerId, movable: _Movable, budget: int
                  ) -> tuple[float, list[tuple[SessionView, WorkerId]]] | None:
    """(gain, [(session, destination)]) of the group with the fewest sessions that can all
    leave `wid` (see the module doc), or None."""
    cfg = view.config.rebalance
    cache = whatif.cache
    groups = whatif.groups(wid)
    load = whatif.load(wid)
    by_key = movable.of(wid)
    for g in sorted(groups, key=lambda g: (g.batch, str(g.key))):
        sessions = by_key.get(g.key, [])
        if len(sessions) != g.batch or g.batch > budget:
            continue  # some are in transit, cooling down or not counted: the round stays
        after = cache.cycle_ms(tuple(x for x in groups if x.key != g.key))
        if load - after <= cfg.gain_threshold_ms:
            continue
        downtime = max(migration_cost_ms(view, cache, s, load, parallel=len(sessions)) for s in sessions)
        cost = cfg.eta * downtime
        if load - after - cost <= cfg.gain_threshold_ms:
            continue  # even free destinations could not pay for the moves
        placed = _destinations_for(view, whatif, order, ready, wid, sessions, load, downtime)
        if placed is None:
            continue
        chosen, worst_dst_ms = placed
        gain = load - max(after, worst_dst_ms) - cost
        if gain > cfg.gain_threshold_ms:
            return gain, chosen
    return None


def _destinations_for(view: ClusterView, whatif: WhatIf, order: LoadOrder, ready: set[WorkerId],
                      src: WorkerId, sessions: list[SessionView], src_load_ms: float, downtime_ms: float
                      ) -> tuple[list[tuple[SessionView, WorkerId]], float] | None:
    """A compatible destination for every session, oldest first (planned on a local overlay
    of the what-if: nothing is applied unless all find one), and the heaviest resulting
    destination cycle; None if one finds none."""
    cfg = view.config
    cache = whatif.cache
    headroom = cfg.placement.memory_headroom
    key = sessions[0].spec.compat_key
    need = cache.full_state_bytes(key.model)
    slo = view.slo_ms(sessions[0].spec)
    fill_ms = cfg.rebalance.regroup_fill * slo
    planned: dict[WorkerId, tuple] = {}  # destination -> its groups with the sessions sent so far
    count: dict[WorkerId, int] = {}
    chosen: list[tuple[SessionView, WorkerId]] = []
    worst = 0.0
    for s in sorted(sessions, key=lambda s: (s.arrival_s, s.id)):
        best = None  # (cycle after, provisioning order, destination)
        seen = 0
        for load, rank, dst in order.ascending():
            if seen >= cfg.rebalance.candidate_workers or load >= src_load_ms:
                break
            if dst == src or dst not in ready:
                continue
            if mixes(whatif, dst, key):  # (what this call plans there adds only `key`)
                continue  # would start the group beside another: the same problem elsewhere
            if not whatif.fits(dst, key, need * (count.get(dst, 0) + 1), headroom):
                continue
            seen += 1
            groups = planned.get(dst) or whatif.groups(dst)
            dst_after = cache.cycle_ms(groups_plus(groups, key, s.context_frames))
            if dst_after >= src_load_ms or dst_after > fill_ms:
                continue
            if downtime_ms + cfg.rebalance.dst_wait * whatif.load(dst) + dst_after > slo:
                continue  # its first chunk there would be late
            if best is None or (dst_after, rank) < best[:2]:
                best = (dst_after, rank, dst)
        if best is None:
            return None
        dst_after, _, dst = best
        planned[dst] = groups_plus(planned.get(dst, whatif.groups(dst)), key, s.context_frames)
        count[dst] = count.get(dst, 0) + 1
        worst = max(worst, dst_after)
        chosen.append((s, dst))
    return chosen, worst
