"""Cruise: many identical back-to-back rounds of one worker in one step, with the same
result as running them one by one.

In: a worker's engine right after `begin_round` planned a round, and the simulated time
at which the worker must be exact again (a command touches it, the controller gets a
pending session, the run ends, or a session's period is about to end). Out: the engine
advanced by the rounds completed by then (chunk indices, what periods still owe, due
times, the executor's chunk counters), a fresh in-flight round for the round running at
that time, and the count of rounds done — the caller records their latencies as one
(value, count) pair and tells the controller with one `round_completed(..., rounds=c)`.

When a worker may cruise (`eligible`): the planned round takes every due session of the
worker (nothing else is due, so the next round is the same batch again); every session's
context is at its attention window (so each round takes the same modelled time, and the
controller's predicted load does not move);
the controller has nothing pending (so round completions would not trigger a decision);
and at least `MIN_ROUNDS` rounds pass before any session's period ends. Until one of
these stops holding, round-by-round would only have repeated the same round, and the
controller would only have counted chunks: its policy never reads the chunk counts (the
equivalence test runs every policy both ways and compares the reports).

Round times are accumulated exactly as the round-by-round run does (t + duration_ms /
1000, one addition per round), so delivery times are the same floats.
"""

from __future__ import annotations

from ..engine.core import EngineCore, InFlightRound
from ..engine.executor import ChunkOutput, RoundPlan, RoundResult

MIN_ROUNDS = 3  # fewer virtual rounds than this are not worth the bookkeeping
MAX_ROUNDS = 1 << 20  # sessions owed chunks without end: re-check at least this often


class Cruise:
    __slots__ = ("rnd", "t0", "d_s", "k", "gen", "end_s", "starts")

    def __init__(self, rnd: InFlightRound, k: int, gen: int, starts: frozenset = frozenset()) -> None:
        self.rnd = rnd  # the round begun at t0, as the engine planned it
        self.starts = starts  # sessions whose first chunk of an active period is in round 1
        self.t0 = rnd.started_s
        self.d_s = rnd.result.duration_ms / 1000.0
        self.k = k  # rounds that may complete before the worker must be exact again
        self.gen = gen  # invalidates a stale end item on the heap
        t = self.t0
        d = self.d_s
        for _ in range(k):
            t = t + d
        self.end_s = t  # when round k completes

    def completed_by(self, now_s: float) -> tuple[int, float]:
        """(rounds completed by now_s, finish time of the last of them (t0 if none))."""
        t = self.t0
        d = self.d_s
        c = 0
        k = self.k
        while c < k:
            nxt = t + d
            if nxt > now_s:
                break
            t = nxt
            c += 1
        return c, t


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


def eligible(engine: EngineCore, rnd: InFlightRound, saturated_context: float) -> int:
    """Rounds the worker may cruise from this planned round (0: run it normally)."""
    if engine.has_due_work():
        return 0  # another group or more sessions than one batch: rounds alternate
    result = rnd.result
    n = len(rnd.plan.session_ids)
    if result.errors or len(result.outputs) != n or n == 0:
        return 0
    for c in rnd.plan.context_frames:
        if c != saturated_context:
            return 0
    k = rounds_before_period_end(engine, rnd)
    return k if k >= MIN_ROUNDS else 0


def advance(engine: EngineCore, cr: Cruise, c: int, tc: float) -> InFlightRound:
    """Apply `c` completed rounds (c >= 1, the last finishing at `tc`) to the engine and
    return the round in flight from `tc`: the state round-by-round would have reached."""
    rnd = cr.rnd
    plan = rnd.plan
    table_get = engine.table.get
    ex_sessions = getattr(engine.executor, "_sessions", None)
    for sid, idx in zip(plan.session_ids, plan.chunk_indices):
        e = table_get(sid)
        e.chunk_index = idx + c
        if not e.unbounded:
            e.chunks_remaining -= c
        e.due_since_s = tc
        if ex_sessions is not None:
            ex_sessions[sid][2] = idx + c + 1  # the executor has planned round c+1
    engine.rounds_done += c
    new_idx = tuple(i + c for i in plan.chunk_indices)
    plan2 = RoundPlan(plan.worker_id, plan.key, plan.session_ids, new_idx, plan.context_frames)
    outputs = tuple(ChunkOutput(sid, i, None) for sid, i in zip(plan.session_ids, new_idx))
    result2 = RoundResult(plan2, outputs, rnd.result.duration_ms, {})
    return InFlightRound(plan2, result2, tc, (tc,) * len(new_idx))
