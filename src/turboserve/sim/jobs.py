"""Policy runs of one trace, one after another or in worker processes (`simulate --jobs N`).

In: the trace (records already mapped to the simulated shape), the latency model, the shape,
the end time, and tasks `(label, policy name, config)` submitted to a `TaskRunner`. Out: per
task, `(label, RunOutput, None)` or `(label, None, why it failed)`; a failing run never stops
the others. `RunOutput` is what a report and its plots need: the summary, the per-chunk
latencies, the GPU series and the end time; engines and controllers stay behind.

Each run is deterministic (seeded, simulated clock), so N processes give the figures one
process gives, N times sooner on N cores. Only wall-clock figures (the controller's decision
times) see the other processes. The trace and model are sent to each worker process once
(pool initializer), not with every task.
"""

from __future__ import annotations

import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..config import TurboConfig
from ..policy.latency import LatencyModel
from ..types import SessionRecord

Task = tuple[str, str, TurboConfig]  # (label, policy name, config)


@dataclass
class RunOutput:
    summary: dict[str, Any]
    latencies: Any  # per-chunk latency distribution (`RunMetrics.latencies()`)
    gpu_series: list  # (time s, provisioned, ready) samples
    end_s: float

    @property
    def cost_usd(self) -> float:
        return self.summary["cost_usd"]


def _failure(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {e} (at {where.filename}:{where.lineno})"


def _run(records: list[SessionRecord], model: LatencyModel, shape: str, until_s: float | None,
         task: Task, progress: bool) -> tuple[str, RunOutput | None, str | None]:
    from .driver import simulate

    label, name, config = task
    try:
        res = simulate(records, name, model, config, until_s=until_s, progress=progress, shape=shape)
    except Exception as e:  # noqa: BLE001 - a crashing policy must not take the others' results
        return label, None, _failure(e)
    return label, RunOutput(res.summary, res.metrics.latencies(), list(res.metrics.gpu_series), res.end_s), None


_TRACE: tuple | None = None  # (records, model, shape, until_s) in a worker process


def _init_worker(records: list[SessionRecord], model: LatencyModel, shape: str, until_s: float | None) -> None:
    global _TRACE
    _TRACE = (records, model, shape, until_s)


def _run_in_worker(task: Task) -> tuple[str, RunOutput | None, str | None]:
    assert _TRACE is not None, "worker process not initialised"
    records, model, shape, until_s = _TRACE
    return _run(records, model, shape, until_s, task, progress=False)


class _Deferred:
    """A task run in this process when its result is asked for (`jobs` 1)."""

    def __init__(self, run) -> None:  # noqa: ANN001 - a thunk
        self._run = run
        self._out = None

    def result(self) -> tuple[str, RunOutput | None, str | None]:
        if self._out is None:
            self._out = self._run()
        return self._out


class TaskRunner:
    """Runs tasks in this process (`jobs` 1, with progress bars) or in up to `jobs` worker
    processes (a line per finished run on stderr where `progress`). `submit` returns a
    handle whose `result()` is `(label, RunOutput | None, error | None)`; tasks may be
    submitted while others run (a run that depends on another's figures starts as soon as
    that one ends)."""

    def __init__(self, records: list[SessionRecord], model: LatencyModel, shape: str,
                 until_s: float | None, *, jobs: int = 1, progress: bool = False) -> None:
        self._trace = (records, model, shape, until_s)
        self._jobs = jobs
        self._progress = progress
        self._pool: ProcessPoolExecutor | None = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> "TaskRunner":
        if self._jobs > 1:
            self._pool = ProcessPoolExecutor(self._jobs, initializer=_init_worker, initargs=self._trace)
        return self

    def __exit__(self, *exc) -> bool:  # noqa: ANN002
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        return False

    def submit(self, task: Task):  # noqa: ANN201 - a Future-like handle
        records, model, shape, until_s = self._trace
        if self._pool is None:
            return _Deferred(lambda: _run(records, model, shape, until_s, task, self._progress))
        fut = self._pool.submit(_run_in_worker, task)
        return _Deferred(lambda: self._collect(task, fut))

    def _collect(self, task: Task, fut) -> tuple[str, RunOutput | None, str | None]:  # noqa: ANN001
        try:
            out = fut.result()
        except Exception as e:  # noqa: BLE001 - e.g. a worker process killed: report, go on
            out = (task[0], None, f"worker process failed: {type(e).__name__}: {e}")
        if self._progress:
            print(f"simulate {task[0]}: done at {time.perf_counter() - self._t0:.0f} s", file=sys.stderr, flush=True)
        return out
