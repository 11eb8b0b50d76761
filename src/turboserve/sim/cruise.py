"""Cruise: a worker's back-to-back rounds of an unchanging batch, run without a heap item
and an engine call per round, with the same result as running them one by one.

In: a worker's engine right after `begin_round` planned a round, and later the simulated
time at which the worker must be exact again (a command touches it, its load is about to
change, the run ends, or a session's period is about to end). Out: the engine
advanced by the rounds completed by then (chunk indices, contexts, what periods still owe,
due times, the executor's chunk counters), the chunk latencies of those rounds, and the
chunk counts the controller has not been told yet.

When a worker may cruise (`plan_cruise`): the planned round takes every due session of the
worker, so the next round is the same batch again (nothing else is due), and at least
`MIN_ROUNDS` rounds pass before a session's period ends (that round runs for real, so the
engine reports the session idle). The controller decides on a round completion only when
the round changed what it holds (a context grew, a period ended) or moved a worker's load
(`Controller._on_round`), so the other rounds need no report of their own.

Context growth: a young session's cache grows each chunk until the attention window, which
changes the round's modelled time and the controller's predicted load. Rounds in which a
context grows are still reported to the controller one by one, at their own time, naming
only the sessions whose context grew (`changing`), so its load and any decision that load
triggers are exactly as round-by-round; the other sessions' chunk counts (which no policy
reads: the equivalence test runs every policy both ways) are told in bulk when the worker
is settled. Round times are accumulated as the engine does (t + duration_ms / 1000, one
addition per round, durations from the executor's own `round_ms`), so they are the same
floats.
"""

from __future__ import annotations

from ..engine.core import EngineCore, InFlightRound
from ..engine.executor import RoundPlan, RoundResult
from ..engine.profiled import chunk_output
from ..types import SessionId

MIN_ROUNDS = 3  # fewer rounds than this are not worth the bookkeeping
MAX_ROUNDS = 1 << 20  # sessions owed chunks without end: re-check at least this often
MAX_GROWTH_ROUNDS = 4096  # contexts growing longer than this: no cruise (never with profiles)


class Cruise:
    __slots__ = ("rnd", "t0", "k", "gen", "end_s", "starts", "durs_ms", "sat_ms", "ctx", "changing",
                 "grow", "told", "seen", "next_s")

    def __init__(self, rnd: InFlightRound, k: int, gen: int, starts: frozenset, durs_ms: list[float],
                 sat_ms: float, ctx: list[list[int]], changing: list[tuple[SessionId, ...]],
                 grow: list[int]) -> None:
        self.rnd = rnd  # round 1, begun at t0, as the engine planned it
        self.t0 = rnd.started_s
        self.k = k  # rounds that may complete before the worker must be exact again
        self.gen = gen  # invalidates stale heap items
        self.starts = starts  # sessions whose first chunk of an active period is in round 1
        self.durs_ms = durs_ms  # duration of rounds 1..len (contexts still growing)
        self.sat_ms = sat_ms  # duration of every later round
        self.ctx = ctx  # ctx[i][m]: context of plan session i after m more chunks (to saturation)
        self.changing = changing  # changing[j-1]: sessions whose context grows with round j
        self.grow = grow  # per plan session: rounds in which its context grows
        self.told = 0  # growth rounds already reported to the controller
        self.seen = (0, self.t0)  # completed_by's last answer: later reads continue from it
        # when the round after `seen`'s completes (-inf: not yet known): a reader that asks
        # before then already has the answer in `seen` (placement reads phases per worker)
        self.next_s = float("-inf")
        # when round k completes; the same additions as round by round (t + ms / 1000)
        t = self.t0
        nd = min(len(durs_ms), k)
        for j in range(nd):
            t = t + durs_ms[j] / 1000.0
        sat_s = sat_ms / 1000.0
        for _ in range(k - nd):
            t = t + sat_s
        self.end_s = t

    def shifted(self, c: int, rnd: InFlightRound, gen: int) -> "Cruise | None":
        """The cruise `plan_cruise` makes from `rnd`, round c+1 of this one as `advance`
        began it, with nothing else touching the worker: the same rounds from c+1 on, so
        the same durations, contexts and end (its completion times are the same float
        additions continued). None where plan_cruise would refuse (too few rounds left)."""
        k = self.k - c
        if k < MIN_ROUNDS:
            return None
        new = Cruise.__new__(Cruise)
        new.rnd = rnd
        new.t0 = rnd.started_s
        new.k = k
        new.gen = gen
        new.starts = frozenset()  # first chunks of periods were all in round 1 of this cruise
        new.ctx = [seq[c:] if c < len(seq) else [seq[-1]] for seq in self.ctx]
        new.grow = [len(seq) - 1 for seq in new.ctx]
        r = max(new.grow)
        new.durs_ms = [self.dur_ms(c + j) for j in range(1, max(r, 1) + 1)]
        new.sat_ms = self.sat_ms
        new.changing = self.changing[c:]
        new.told = 0
        new.seen = (0, new.t0)
        new.next_s = float("-inf")
        new.end_s = self.end_s
        return new

    def dur_ms(self, j: int) -> float:
        """Modelled duration of round j (1-based)."""
        return self.durs_ms[j - 1] if j <= len(self.durs_ms) else self.sat_ms

    def finish_s(self, j: int) -> float:
        t = self.t0
        for i in range(1, j + 1):
            t = t + self.dur_ms(i) / 1000.0
        return t

    def completed_by(self, now_s: float) -> tuple[int, float]:
        """(rounds completed by now_s, finish time of the last of them (t0 if none)).
        Simulated time only moves forward: a read continues from the previous one."""
        c, t = self.seen
        if t > now_s:
            c, t = 0, self.t0
        c, t, self.next_s = self._count(c, t, now_s)
        self.seen = (c, t)
        return c, t

    def _count(self, c: int, t: float, now_s: float) -> tuple[int, float, float]:
        """(rounds completed by now_s, the last one's finish, the next one's finish (inf
        after round k)), counting on from round c finished at t."""
        k = self.k
        durs = self.durs_ms
        nd = min(len(durs), k)
        while c < nd:
            nxt = t + durs[c] / 1000.0
            if nxt > now_s:
                return c, t, nxt
            t = nxt
            c += 1
        sat_s = self.sat_ms / 1000.0
        while c < k:
            nxt = t + sat_s
            if nxt > now_s:
                return c, t, nxt
            t = nxt
            c += 1
        return c, t, float("inf")


def rounds_before_period_end(engine: EngineCore, rnd: InFlightRound) -> int:
    """How many rounds, this one included, complete before one of its sessions' period
    ends (that round must run for real: the engine reports the session idle)."""
    least = MAX_ROUNDS + 1
    get = engine.table.get
    for sid in rnd.plan.session_ids:
        e = get(sid)
        if not e.active or e.held:
            return 0
        if not e.unbounded and e.chunks_remaining < least:
            least = e.chunks_remaining
    return least - 1


def plan_cruise(engine: EngineCore, rnd: InFlightRound, gen: int, starts: frozenset) -> Cruise | None:
    """A cruise from this just-planned round, or None when the worker must run it normally."""
    if engine.has_due_work():
        return None  # another group or more sessions than one batch: rounds alternate
    result = rnd.result
    plan = rnd.plan
    n = len(plan.session_ids)
    if result.errors or len(result.outputs) != n or n == 0:
        return None
    round_ms = getattr(engine.executor, "round_ms", None)
    if round_ms is None:
        return None  # only the profiled executor's durations can be known ahead
    k = rounds_before_period_end(engine, rnd)
    if k < MIN_ROUNDS:
        return None
    ctx_fn = engine._context  # the engine's own context growth (model.context_after)
    table_get = engine.table.get
    ctx: list[list[int]] = []
    grow: list[int] = []
    sat = _saturated(engine, plan.key.model)
    for sid, c0 in zip(plan.session_ids, plan.context_frames):
        if c0 == sat:  # at the window already: no growth (the common case)
            ctx.append([c0])
            grow.append(0)
            continue
        e = table_get(sid)
        idx0 = e.chunk_index
        seq = [c0]
        # contexts after 1, 2, ... more chunks until they stop growing
        while True:
            e.chunk_index = idx0 + len(seq)
            v = ctx_fn(e)
            if v == seq[-1] or len(seq) > MAX_GROWTH_ROUNDS:
                break
            seq.append(v)
        e.chunk_index = idx0
        if len(seq) > MAX_GROWTH_ROUNDS:
            return None
        ctx.append(seq)
        grow.append(len(seq) - 1)
    r = max(grow)
    key = plan.key
    durs = [result.duration_ms]
    for j in range(2, r + 2):  # round j runs on the contexts after j-1 chunks
        total = 0
        for seq in ctx:
            total += seq[j - 1] if j - 1 < len(seq) else seq[-1]
        durs.append(round_ms(key.model, n, total / n, key.steps))
    sat_ms = durs.pop() if r > 0 else durs[0]
    changing = [tuple(sid for sid, g in zip(plan.session_ids, grow) if g >= j) for j in range(1, r + 1)]
    return Cruise(rnd, k, gen, starts, durs, sat_ms, ctx, changing, grow)


_SATURATED: dict[tuple[object, str], float | None] = {}  # (model object, shape) -> context


def _saturated(engine: EngineCore, shape: str) -> float | None:
    """The context a session of `shape` ends up with (its window), per latency model."""
    model = engine.model
    key = (model, shape)
    if key not in _SATURATED:
        try:
            _SATURATED[key] = float(model.context_after(shape, 1 << 30)) if model is not None else None
        except (KeyError, ValueError, LookupError):
            _SATURATED[key] = None
    return _SATURATED[key]


def advance(engine: EngineCore, cr: Cruise, c: int, tc: float, begin_next: bool) -> InFlightRound | None:
    """Apply `c` completed rounds (c >= 1, the last finishing at `tc`) to the engine: the
    state round-by-round reaches at `tc`. With `begin_next`, round c+1 is in flight from
    `tc` (returned); without, its sessions are due from `tc` and the caller begins it."""
    rnd = cr.rnd
    plan = rnd.plan
    table_get = engine.table.get
    ex_sessions = getattr(engine.executor, "_sessions", None)
    former = engine.former
    new_ctx = []
    for i, (sid, idx) in enumerate(zip(plan.session_ids, plan.chunk_indices)):
        e = table_get(sid)
        seq = cr.ctx[i]
        e.chunk_index = idx + c
        e.context_frames = seq[c] if c < len(seq) else seq[-1]
        new_ctx.append(e.context_frames)
        if not e.unbounded:
            e.chunks_remaining -= c
        e.due_since_s = tc
        if begin_next:
            if ex_sessions is not None:
                ex_sessions[sid][2] = idx + c + 1  # the executor has planned round c+1
        else:
            e.in_flight = False
            if ex_sessions is not None:
                ex_sessions[sid][2] = idx + c
    if not begin_next:
        former.mark_due_many(plan.key, list(plan.session_ids), tc)
    engine.rounds_done += c
    if not begin_next:
        return None
    new_idx = tuple(i + c for i in plan.chunk_indices)
    plan2 = RoundPlan(plan.worker_id, plan.key, plan.session_ids, new_idx, tuple(new_ctx))
    outputs = tuple(chunk_output(sid, i) for sid, i in zip(plan.session_ids, new_idx))
    result2 = RoundResult(plan2, outputs, cr.dur_ms(c + 1), {})
    return InFlightRound(plan2, result2, tc, (tc,) * len(new_idx))


def untold(cr: Cruise, c: int) -> dict[int, list[SessionId]]:
    """Chunks per session the controller has not been told after `c` completed rounds,
    grouped: count -> sessions (growth rounds already reported are subtracted)."""
    out: dict[int, list[SessionId]] = {}
    told = cr.told
    for sid, g in zip(cr.rnd.plan.session_ids, cr.grow):
        n = c - min(told, g, c)
        if n > 0:
            out.setdefault(n, []).append(sid)
    return out
