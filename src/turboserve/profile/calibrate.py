"""Calibrate a profile on rounds timed while serving.

In: a `ShapeProfile` (measured by `turboserve profile`, engines alone on the device) and the
rounds the live engines ran with it, each `(batch, mean context frames, steps, measured
ms)` (`LiveRuntime.add_round_listener` gives them). Out: the same profile with its round
times scaled by the median of measured over predicted, per batch size where that batch ran
at least `MIN_BATCH_ROUNDS` rounds (the nearest such batch's scale elsewhere; the profile's
batch curve need not hold under serving), the fixed per-chunk cost by the overall median,
and `jitter` set to the quantiles of each round's excess over its batch's scaled prediction,
in ms (`jitter_unit` "ms"; `unit="ratio"`: of its ratio over that scale). Given which
rounds began while another engine of the host was mid-round (`busy_at_start`, from each
round's worker and times), `jitter` takes the rounds begun alone and `jitter_shared` the
others, where each kind has at least `MIN_BATCH_ROUNDS` rounds. A batch size with at least
`MIN_JITTER_BATCH_ROUNDS` rounds of a kind gets that kind's table of its own
(`jitter_by_batch`, `jitter_shared_by_batch`); the pooled table serves the others.

Why: a profile measured alone predicts how fast an engine runs alone. Where engines share
what the profiler had to itself (CPU engines sharing cores with each other, the HTTP server
and the video encoders), rounds run slower and vary: on a 2-core machine serving two CPU
engines, batch-1 rounds profiled at 55 ms were timed at 55-130 ms. The median carries the
slow-down into every prediction (placement and the autoscaler see it too); the jitter lets
the simulator draw each round's time, which the tail of the chunk latencies follows. On a
GPU the ratios sit near 1 and the calibration changes little. Why ms, not ratios: what slows
a round on a shared CPU is interruptions that last about as long whatever the round; the
timed rounds are mostly short (batch 1), and their ratios applied to the rarer long ones
(batch 2 and more) overstated those rounds' tail: on 1,008 chunks of `bench/fidelity.py`,
a simulation calibrated on the trace's own rounds put the p99 chunk 21% over the live one
with ratios and 0.1% with ms. Why tables per batch size: a longer round still gathers more
interruptions, and a pooled table carries the calibration workload's mix of batch sizes into
the simulated one: in one live run of `bench/fidelity.py` the calibration copies ran 150
batch-2 rounds to the compared copies' 11, and the simulated p99 was 8.6% over the live one
pooled, 7.6% under it per batch size.

From the command line: `turboserve serve --record-rounds R.jsonl` writes one line per
round (`RoundRecorder`), and `turboserve profile --calibrate R.jsonl --base P --out F`
writes the calibrated profile (`read_rounds`, `calibrate`).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Hashable, Iterable, Sequence

from .format import JITTER_UNITS, RoundPoint, ShapeProfile
from .model import ProfileLatencyModel

# 0%, 1%, ..., 100%. The simulator draws linearly between them, so the top segment spreads
# its share of the draws up to the single slowest round timed: with 41 points (2.5% each) an
# outlier there lifted the simulated p99 round by 12% over the timed one (452 rounds of
# bench/fidelity.py); with 101 the draws' p99 is the timed p99.
JITTER_QUANTILES = 101
MIN_ROUNDS = 20  # fewer timed rounds say too little about a distribution
MIN_BATCH_ROUNDS = 10  # a batch size with fewer takes the nearest better-timed batch's scale
# A batch size with fewer rounds of a kind draws from the kind's table pooled over batch sizes:
# a table of its own would be a handful of rounds spread over 101 quantiles.
MIN_JITTER_BATCH_ROUNDS = 30


def round_ratios(profile: ShapeProfile, rounds: Iterable[tuple[int, float, int, float]]
                 ) -> list[tuple[int, float]]:
    """(batch, measured over predicted time) of each timed round (batch >= 1, measured > 0)."""
    return [(b, r) for _, b, r in _indexed_ratios(profile, rounds)]


def _indexed_ratios(profile: ShapeProfile, rounds: Iterable[tuple[int, float, int, float]]
                    ) -> list[tuple[int, int, float]]:
    """(index in `rounds`, batch, ratio) of each usable round."""
    model = ProfileLatencyModel([replace(profile, jitter=[], jitter_shared=[])])
    name, fixed = profile.name, profile.fixed_ms
    out = []
    for i, (batch, context, steps, measured_ms) in enumerate(rounds):
        if batch < 1 or measured_ms <= 0:
            continue
        predicted = model.round_ms(name, batch, context, steps) + batch * fixed
        if predicted > 0:
            out.append((i, batch, measured_ms / predicted))
    return out


def batch_scales(ratios: list[tuple[int, float]]) -> tuple[float, dict[int, float]]:
    """(overall median ratio, batch -> median ratio of the batches timed often enough)."""
    by_batch: dict[int, list[float]] = {}
    for b, r in ratios:
        by_batch.setdefault(b, []).append(r)
    scales = {b: statistics.median(rs) for b, rs in by_batch.items() if len(rs) >= MIN_BATCH_ROUNDS}
    return statistics.median(r for _, r in ratios), scales


def scale_for(batch: int, overall: float, scales: dict[int, float]) -> float:
    if batch in scales:
        return scales[batch]
    if not scales:
        return overall
    return scales[min(scales, key=lambda b: (abs(b - batch), b))]


def quantiles(values: list[float], n: int = JITTER_QUANTILES) -> list[float]:
    """n evenly spaced quantiles, 0% and 100% included (linear between order statistics)."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs * n
    out = []
    for i in range(n):
        pos = i * (len(xs) - 1) / (n - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def busy_at_start(timings: Sequence[tuple[Hashable, float, float]]) -> list[bool]:
    """For each round `(worker, start_s, end_s)`: whether another worker was mid-round when
    it began (a sweep over the rounds in start order)."""
    events = sorted((start, i) for i, (_, start, _) in enumerate(timings))
    out = [False] * len(timings)
    running: list[tuple[float, Hashable]] = []  # (end_s, worker) of rounds begun so far
    for start, i in events:
        running = [(end, w) for end, w in running if end > start]
        me = timings[i][0]
        out[i] = any(w != me for _, w in running)
        running.append((timings[i][2], me))
    return out


def calibrate(profile: ShapeProfile, rounds: Sequence[tuple[int, float, int, float]],
              note: str = "", shared: Sequence[bool] | None = None, unit: str = "ms",
              by_batch: bool = True) -> ShapeProfile:
    """The profile scaled to the median measured/predicted ratio (per batch), with the
    rounds' spread around it as `jitter` (and `jitter_shared`, see the module doc; `shared`
    is aligned with `rounds`): each round's measured ms less its scaled prediction (`unit`
    "ms"), or its ratio over its batch's scale ("ratio"); `by_batch=False`: no per-batch
    tables. Raises ValueError with fewer than MIN_ROUNDS usable rounds."""
    if shared is not None and len(shared) != len(rounds):
        raise ValueError(f"{len(shared)} busy-at-start flags for {len(rounds)} rounds")
    if unit not in JITTER_UNITS:
        raise ValueError(f"jitter unit {unit!r} is not one of {', '.join(JITTER_UNITS)}")
    indexed = _indexed_ratios(profile, rounds)
    ratios = [(b, r) for _, b, r in indexed]
    if len(ratios) < MIN_ROUNDS:
        raise ValueError(f"calibration needs at least {MIN_ROUNDS} timed rounds of shape "
                         f"{profile.name!r}, got {len(ratios)}")
    overall, scales = batch_scales(ratios)

    def spread(i: int, b: int, r: float) -> float:
        scale = scale_for(b, overall, scales)
        if unit == "ratio":
            return r / scale
        measured = rounds[i][3]
        return measured - scale * measured / r  # ms over the scaled prediction
    rel = [(spread(i, b, r), b, bool(shared[i]) if shared is not None else False) for i, b, r in indexed]
    alone = [(x, b) for x, b, f in rel if not f]
    beside = [(x, b) for x, b, f in rel if f]
    split = len(alone) >= MIN_BATCH_ROUNDS and len(beside) >= MIN_BATCH_ROUNDS
    if not split:
        alone, beside = [(x, b) for x, b, _ in rel], []
    jitter, jitter_shared = quantiles([x for x, _ in alone]), quantiles([x for x, _ in beside]) if beside else []
    jitter_by_batch = _batch_tables(alone) if by_batch else {}
    jitter_shared_by_batch = _batch_tables(beside) if by_batch else {}
    q = quantiles([r for _, r in ratios], 101)
    per_batch = ", ".join(f"batch {b} x{v:.3f}" for b, v in sorted(scales.items()))
    source = (f"{profile.source}; calibrated on {len(ratios)} rounds timed while serving"
              f"{' (' + note + ')' if note else ''}: x{overall:.3f}{' (' + per_batch + ')' if per_batch else ''}, "
              f"ratio p10/p90/p99 {q[10]:.2f}/{q[90]:.2f}/{q[99]:.2f}"
              + (f"; {len(beside)} begun beside another engine, median {_spread(statistics.median(x for x, _ in beside), unit)} "
                 f"of the {len(alone)} begun alone's {_spread(statistics.median(x for x, _ in alone), unit)}"
                 if jitter_shared else "")
              + f"; jitter in {unit}"
              + (f", own tables for batch {sorted(set(jitter_by_batch) | set(jitter_shared_by_batch))}"
                 if jitter_by_batch or jitter_shared_by_batch else ""))
    # A round's predicted time is its table time plus batch x fixed_ms; the fixed cost takes
    # the overall scale, the table the rest, so batch b's whole prediction scales by its own.
    fixed = profile.fixed_ms
    rows = []
    for r in profile.rounds:
        total = scale_for(r.batch, overall, scales) * (r.round_ms + r.batch * fixed)
        rows.append(RoundPoint(r.batch, r.context_frames, max(total - r.batch * fixed * overall, 1e-3)))
    return replace(profile, rounds=rows, fixed_ms=fixed * overall, jitter=jitter, jitter_shared=jitter_shared,
                   jitter_unit=unit, jitter_by_batch=jitter_by_batch, jitter_shared_by_batch=jitter_shared_by_batch,
                   source=source.lstrip("; "))


def _batch_tables(spreads: list[tuple[float, int]]) -> dict[int, list[float]]:
    """batch -> quantiles of the spreads of its rounds, for batches with enough rounds; none
    when only one batch size has (the pooled table is then that batch's already, nearly)."""
    by: dict[int, list[float]] = {}
    for x, b in spreads:
        by.setdefault(b, []).append(x)
    tables = {b: quantiles(xs) for b, xs in by.items() if len(xs) >= MIN_JITTER_BATCH_ROUNDS}
    return tables if len(tables) > 1 else {}


def _spread(v: float, unit: str) -> str:
    return f"x{v:.2f}" if unit == "ratio" else f"{v:+.1f} ms"


def timed_round(model: Any, outcome: Any) -> tuple[int, float, int, float]:
    """(batch, mean context frames, steps, measured ms) of a finished round (an engine's
    `RoundOutcome`); contexts from the latency model's growth rule, as the scheduler has them."""
    shape = outcome.key.model
    idx = outcome.chunk_indices
    ctx = sum(model.context_after(shape, i) for i in idx) / len(idx) if idx else 0.0
    return len(idx), ctx, outcome.key.steps, outcome.duration_ms


class RoundRecorder:
    """A round listener (`LiveRuntime.add_round_listener`) appending one JSON line per round:
    `{"shape", "batch", "context_frames", "steps", "round_ms", "worker", "end_s"}` (`end_s`:
    a monotonic clock when the engine reported the round). Thread-safe (engines call it
    from their own threads); `close()` when done."""

    def __init__(self, path: str | Path, model: Any):
        self.model = model
        self._lock = threading.Lock()
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - closed by close()

    def __call__(self, worker_id: Any, outcome: Any) -> None:
        if not outcome.chunk_indices:
            return
        batch, ctx, steps, ms = timed_round(self.model, outcome)
        line = json.dumps({"shape": outcome.key.model, "batch": batch, "context_frames": ctx,
                           "steps": steps, "round_ms": ms, "worker": str(worker_id),
                           "end_s": round(time.monotonic(), 6)})
        with self._lock:
            if not self._file.closed:  # a round finishing while the server shuts down
                self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_rounds(path: str | Path, shape: str) -> list[tuple[int, float, int, float]]:
    """The rounds of `shape` in a file `RoundRecorder` wrote; a bad line is an error naming it."""
    return read_timed_rounds(path, shape)[0]


def read_timed_rounds(path: str | Path, shape: str) -> tuple[list[tuple[int, float, int, float]], list[bool] | None]:
    """(rounds of `shape`, whether each began beside another worker's round) from a file
    `RoundRecorder` wrote; the flags are None unless every line carries its worker and time.
    Rounds of every shape in the file count as neighbours."""
    out: list[tuple[int, float, int, float]] = []
    timings: list[tuple[str, float, float] | None] = []
    mine: list[int] = []  # line index of each round of `shape`
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                ms = float(d["round_ms"])
                timing = None
                if "worker" in d and "end_s" in d:
                    timing = (str(d["worker"]), float(d["end_s"]) - ms / 1000.0, float(d["end_s"]))
                if d["shape"] == shape:
                    mine.append(len(timings))
                    out.append((int(d["batch"]), float(d["context_frames"]), int(d["steps"]), ms))
                timings.append(timing)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a timed round ({type(e).__name__}: {e}); expected "
                                 '{"shape", "batch", "context_frames", "steps", "round_ms"[, "worker", "end_s"]}'
                                 ) from None
    if not timings or any(t is None for t in timings):
        return out, None
    busy = busy_at_start(timings)  # type: ignore[arg-type]
    return out, [busy[i] for i in mine]
