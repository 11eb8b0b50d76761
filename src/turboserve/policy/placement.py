"""Place: pending sessions (new, or resuming from host memory) onto READY workers.

In: the view's `pending` sessions in arrival order, a `WhatIf` of worker loads and memory,
and a chooser. Out: `Placement`s (applied to the what-if as they are made, so several
placements in one call see each other) and the sessions left pending.

A worker is feasible for a session when it is READY and has room for the session's state
at its full attention window (`model.state_bytes(shape, window)`) plus the activations of
its largest round, never planning `placement.memory_headroom` of its memory. Choosers:
- `MinMaxChooser` (TurboServe): the feasible worker minimising the resulting maximum
  predicted latency over the cluster, among the workers where the session is compatible:
  those running its CompatKey's group, or no group. Beside another group it would run a
  round of its own, and a round costs far more than one more session in it (demo91 at 4
  steps: 93 ms alone, 2.5 ms more per session), so a worker holding two groups serves
  fewer sessions than one holding either (demo91 within 250 ms: ~19 of 2 and 4 steps
  together, against 22 of 4 steps or 30 of 2), for as long as both stay there. Min-max
  alone picks such a worker whenever it ends lighter, and under load every worker ends
  up mixed. It still goes beside another group where no compatible worker has room, or
  where the best compatible one would run past the session's SLO and the other scores
  better. Among equal maxima the lighter resulting load (the maximum is often set by
  another, overloaded worker: this keeps spreading); where that ties too, a worker already
  holding the session's CompatKey (coalescing), then provisioning order. Coalescing mostly
  wins on its own: joining a group adds less time than starting a new round. Scans
  workers least loaded first and stops at a provable lower bound, or after scoring
  `placement.candidate_workers` feasible workers: in a balanced cluster hundreds of
  workers sit within one session's cost of each other, and scoring them all would cost
  milliseconds for a choice among near-equals (exact whenever the bound stops the scan
  first, as in every cluster of up to that many workers).
  The placed session's own first chunk is one of the latencies in that maximum: it waits
  for the round in progress on the worker to end (`next_round_wait_ms`, from the worker's
  last reported round and its cycle; plus the restore copy of a resumed session), then for
  its own round. Under load a worker's cycle is most of the SLO, so a first chunk that
  lands just after a round began misses it; the term steers it to a worker whose next
  round starts soon, and changes nothing while it stays below the other workers' loads.
- `LeastLoadedChooser` (static-ll, autoscale-only, migrate-only): the feasible worker with
  the lowest current load.
- `RoundRobinChooser` (static-rr): the next feasible worker in provisioning order after
  the previous choice; its cursor lives in the policy's memory.
"""

from __future__ import annotations

from typing import Protocol

from ..types import CompatKey, SessionId, WorkerId
from .latency import transfer_ms
from .views import ClusterView, Placement, SessionView
from .whatif import LoadOrder, WhatIf


def next_round_wait_ms(view: ClusterView, wid: WorkerId, delay_ms: float = 0.0) -> float:
    """Milliseconds from `view.now_s` until worker `wid` begins a round that a session
    ready `delay_ms` from now can join. From the worker's last reported round completion
    (`view.last_round`) a round of the duration recorded then runs, then rounds of its
    cycle (`load_ms`) back to back; an idle worker, or one with no reported round yet,
    starts at once."""
    load = view.workers[wid].load_ms
    last = view.last_round.get(wid)
    if load <= 0.0 or last is None:
        return delay_ms
    t0, first_ms = last
    since = (view.now_s - t0) * 1000.0 + delay_ms  # from that completion to ready
    if since <= 1e-6:
        return delay_ms  # a round just ended: the next one is formed with this session in it
    if first_ms > 0.0:
        if since <= first_ms:
            return delay_ms + first_ms - since
        since -= first_ms
    phase = since % load
    return delay_ms + (0.0 if phase <= 1e-6 else load - phase)


def first_chunk_delay_ms(view: ClusterView, session: SessionView) -> float:
    """Time before a pending session can run on its new worker: the host-to-GPU copy of
    its state when it resumes from host memory (it has chunks done), else 0."""
    if session.chunks_done <= 0 or session.state_bytes <= 0:
        return 0.0
    link = view.config.link("host")
    return transfer_ms(session.state_bytes, link.alpha_ms, link.bandwidth_gbps)


class Chooser(Protocol):
    def choose(self, session: SessionView, key: CompatKey, need_bytes: int) -> WorkerId | None: ...


class MinMaxChooser:
    def __init__(self, whatif: WhatIf, order: LoadOrder, ready: set[WorkerId], headroom_frac: float,
                 max_scored: int = 32):
        self.whatif = whatif
        self.order = order
        self.ready = ready
        self.headroom = headroom_frac
        self.max_scored = max(1, max_scored)

    def choose(self, session: SessionView, key: CompatKey, need_bytes: int) -> WorkerId | None:
        wi, order = self.whatif, self.order
        ctx = session.context_frames
        top = order.top()
        if top is None:
            return None
        top_load, _, top_wid = top
        second = order.second()
        # The stop rule below takes a worker's resulting load to be at least its load plus
        # the session's fixed per-chunk cost. Nearly always so, not always: a fresh session
        # lowers its group's mean context, which can shorten the round (demo91: by up to
        # 5 ms, one session at a short context joined by a new one), so it is a rule, not a
        # bound: a worker it passes over could, rarely, have scored a little better.
        floor_ms = wi.cache.fixed_ms(key.model)
        best: tuple[float, float, int, int] | None = None  # joining its group, or an empty worker
        best_wid = None
        good = False  # `best` keeps its worker's cycle within the session's SLO
        mixed: tuple[float, float, int, int] | None = None  # beside other groups
        mixed_wid = None
        new_group_seen = [False, False]  # [alone, beside other groups]: a new group was scored
        seen: dict[float, list] = {}  # wait -> groups scored with it
        budget = self.max_scored
        view = wi.view
        slo_ms = view.slo_ms(session.spec)
        phased = bool(view.last_round)  # round phases known: equal groups may still differ
        delay = first_chunk_delay_ms(view, session) if phased else 0.0
        for load, rank, wid in order.ascending():
            if wid not in self.ready:
                continue
            if budget <= 0:
                break  # the lightest workers were scored: a heavier one rarely wins
            # No later worker changes the choice: its resulting max is at least max(second,
            # load + floor) and its own resulting load at least `load + floor`, so it
            # cannot beat `best`, nor, unless `best` is good, the lesser of the two (nor,
            # with no `best` yet, be good: over the SLO).
            low = load + floor_ms
            bound = (max(second, low), low)
            if best is not None:
                if bound > best[:2] and (good or mixed is None or bound > mixed[:2] or best < mixed):
                    break
            elif mixed is not None and low > slo_ms and bound > mixed[:2]:
                break
            room = wi.room_to_join(wid, key, need_bytes, self.headroom)
            if room is None:
                continue
            groups, same = room
            wait = next_round_wait_ms(view, wid, delay) if phased else 0.0
            scored = seen.get(wait)
            if scored is None:
                seen[wait] = [groups]
            elif groups in scored:
                continue  # same groups and phase as a worker already scored (ranked before it)
            else:
                scored.append(groups)
            if not same and new_group_seen[bool(groups)]:
                continue  # a new group adds the same time everywhere: the lighter one won
            new_load = wi.load_joining(groups, key, ctx)
            budget -= 1
            others = second if wid == top_wid else top_load
            # the session's first chunk: the round in progress there, then its own round
            first = wait + new_load
            score = (max(others, first), new_load, 0 if same else 1, rank)
            if not same and groups:
                if mixed is None or score < mixed:
                    mixed, mixed_wid = score, wid
            elif best is None or score < best:
                best, best_wid = score, wid
                good = new_load <= slo_ms
            if not same and not phased:
                new_group_seen[bool(groups)] = True
        if mixed is not None and (best is None or (not good and mixed < best)):
            return mixed_wid
        return best_wid


class LeastLoadedChooser:
    def __init__(self, whatif: WhatIf, order: LoadOrder, ready: set[WorkerId], headroom_frac: float):
        self.whatif = whatif
        self.order = order
        self.ready = ready
        self.headroom = headroom_frac

    def choose(self, session: SessionView, key: CompatKey, need_bytes: int) -> WorkerId | None:
        for _, _, wid in self.order.ascending():
            if wid in self.ready and self.whatif.fits(wid, key, need_bytes, self.headroom):
                return wid
        return None


class RoundRobinChooser:
    """Cycles over the workers in provisioning order; `cursor` is the index the next
    search starts from (carried in the policy's memory between calls)."""

    def __init__(self, whatif: WhatIf, workers: list[WorkerId], ready: set[WorkerId],
                 headroom_frac: float, cursor: int):
        self.whatif = whatif
        self.workers = workers
        self.ready = ready
        self.headroom = headroom_frac
        self.cursor = cursor

    def choose(self, session: SessionView, key: CompatKey, need_bytes: int) -> WorkerId | None:
        n = len(self.workers)
        for step in range(n):
            i = (self.cursor + step) % n
            wid = self.workers[i]
            if wid in self.ready and self.whatif.fits(wid, key, need_bytes, self.headroom):
                self.cursor = (i + 1) % n
                return wid
        return None


def place_pending(view: ClusterView, whatif: WhatIf,
                  chooser: Chooser) -> tuple[list[Placement], list[SessionId]]:
    """Place every pending session the chooser finds room for, in arrival order.

    Returns (placements, still-pending session ids). Once a CompatKey found no room, later
    sessions of the same key are not searched again in this call (placements only use up
    memory), so a long queue on a full cluster costs O(queue), not O(queue x workers)."""
    placements: list[Placement] = []
    left: list[SessionId] = []
    no_room: set[CompatKey] = set()
    cache = whatif.cache
    for sid in view.pending:
        s = view.sessions.get(sid)
        if s is None:
            continue
        key = s.spec.compat_key
        if key in no_room:
            left.append(sid)
            continue
        need = cache.full_state_bytes(key.model)
        wid = chooser.choose(s, key, need)
        if wid is None:
            no_room.add(key)
            left.append(sid)
            continue
        whatif.add(wid, key, s.context_frames, need, active=True)
        placements.append(Placement(sid, wid))
    return placements, left

