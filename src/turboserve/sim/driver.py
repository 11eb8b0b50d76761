"""Trace replay: one policy's run of a session trace on simulated GPUs.

In: `SessionRecord`s (already mapped to the simulated shape), a policy name, the latency
model and the config. Out: a `SimResult` with the run's `RunMetrics` summary, its time
series and the controller (counters, decision times).

The replay: each session arrives (`SessionArrived` with its first period's chunks); when
its engine reports the period done (the transport's `on_idle`), the next period starts
`idle_s` after the viewer has *watched* it (`SessionActivated`), or after its last period
the session departs (`SessionDeparted`). The viewer watches in real time: a period of n
chunks that began at t is watched until max(t + n x chunk playback time, the last chunk's
delivery). So a policy that generates ahead of playback does not shorten the sessions,
and every policy that keeps up faces the same session timeline (the trace's nominal one,
which the oracle bounds also use); one that falls behind stretches it. A `Tick` reaches the controller every
`sim.tick_s`. Everything else — placement, migration, scaling, offload — is the real
`Controller` running the registered policy over `SimTransport` engines.

Warm start: a replayed trace window is a slice of a service that was already running, so
unless `autoscale.initial_gpus` is set (> 0), every autoscaling policy (`autoscale-only`
and the autoscaling `turboserve` variants alike) starts with `warm_start_gpus` workers
ready: the GPUs the trace's nominal demand (`traces.rescale.demand_curve`, perfect
packing at the SLO) peaks at over its first `cluster.startup_delay_s`, rounded up, within
[min_gpus, gpus]. Fixed-count policies are unaffected (they start at `cluster.gpus`).

The run ends when every session has departed (billing stops there) or at `until_s`
(chunks still owed then are counted as late with their wait so far).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..cluster.controller import Controller
from ..config import TurboConfig
from ..events import SessionActivated, SessionArrived, SessionDeparted, Tick
from ..policy.latency import LatencyModel
from ..policy.registry import get_policy
from ..types import SessionRecord
from .loop import EventLoop
from .metrics import Prices, RunMetrics
from .transport import SimTransport

# Without an explicit end, a run whose sessions cannot all be served (starved) stops this
# long after the trace's nominal end (`nominal_end_s` at the SLO's pace where that is slower
# than playback), with the owed chunks counted late.
DRAIN_GRACE_S = 600.0


@dataclass
class SimResult:
    policy: str
    summary: dict[str, Any]
    metrics: RunMetrics
    end_s: float
    controller: Controller
    transport: SimTransport
    events: int  # heap items handled
    extra: dict[str, Any] = field(default_factory=dict)


def slo_for(config: TurboConfig, records: list[SessionRecord], model: LatencyModel) -> tuple[float, float]:
    """(SLO ms, playback ms of a chunk) of a run: the configured SLO, else the playback time."""
    if records:
        playback_ms = 1000.0 * records[0].spec.chunk_seconds
    else:
        playback_ms = 250.0
    return (config.slo.slo_ms or playback_ms), playback_ms


def nominal_end_s(records: list[SessionRecord], chunk_s: float = 0.0) -> float:
    """When the last session would leave with every chunk on its viewer's timeline, each
    chunk taking its playback time or `chunk_s`, whichever is longer (a shape slower than
    playback, served within an SLO longer than a chunk, stretches its sessions)."""
    end = 0.0
    for r in records:
        t = r.arrival_s
        per_chunk_s = max(r.spec.chunk_seconds, chunk_s)
        for i, p in enumerate(r.periods):
            t += r.chunks_in_period(i) * per_chunk_s + p.idle_s
        end = max(end, t)
    return end


class TraceDriver:
    def __init__(self, records: list[SessionRecord], policy_name: str, model: LatencyModel,
                 config: TurboConfig, *, shape: str | None = None, frames: bool = False,
                 on_outcome: Callable | None = None, cruise: bool = True) -> None:
        self.records = records
        self.config = config
        self.loop = EventLoop()
        slo_ms, playback_ms = slo_for(config, records, model)
        c = config.cluster
        self.metrics = RunMetrics(slo_ms, playback_ms, Prices(c.price_per_gpu_hour_usd,
                                                              c.spot_price_per_gpu_hour_usd, c.spot_fraction))
        self.transport = SimTransport(self.loop, model, config, self.metrics, frames=frames,
                                      on_outcome=on_outcome, cruise=cruise)
        self.transport.on_idle = self._on_idle
        self.policy_name = policy_name
        if shape is None and records:
            shape = records[0].spec.model
        policy = get_policy(policy_name)
        self.controller = Controller(policy, model, config, self.transport, shape=shape)
        state = self.controller.state
        # A policy that reads round phases (`ClusterView.last_round`) must see, for each
        # worker it looks at, the phase round-by-round reporting would give: a cruising
        # worker's completed rounds are reported when its phase is read or its load is about
        # to change (then its phase is recorded with the load its rounds ran with). Other
        # policies need no hook. A policy that does not say is assumed to read them.
        if getattr(policy, "reads_round_phase", True):
            ctl = self.controller
            state.set_phase_hook(lambda wid: self.transport.report_worker(wid, ctl.now_s),
                                 before_read=lambda wid: self.transport.read_phase(wid, ctl.now_s))
            self.transport.note_phase = state.note_round_completion
        # cruise (sim/cruise.py): rounds run in one step are counted straight into the
        # controller's state
        self.transport.apply_rounds = state.round_completed
        self._period: dict[str, int] = {}  # sid -> index of its current period
        self._period_start: dict[str, float] = {}  # sid -> when its current period began
        self._by_id = {r.id: r for r in records}
        if len(self._by_id) != len(records):
            raise ValueError("trace has duplicate session ids")
        self._live = 0  # arrived and not departed
        self._left = len(records)  # not yet departed
        self._active = 0
        self.last_departure_s = 0.0

    # ------------------------------------------------------------------ items
    def _deliver(self, now_s: float, event) -> None:
        self.controller.on_event(event)

    def _arrive(self, now_s: float, rec: SessionRecord) -> None:
        self._period[rec.id] = 0
        self._period_start[rec.id] = now_s
        self._live += 1
        self._active += 1
        self.metrics.active_changed(now_s, self._active)
        self.controller.on_event(SessionArrived(now_s, rec.id, rec.spec, rec.prompt,
                                                chunks_wanted=rec.chunks_in_period(0)))

    def _on_idle(self, now_s: float, sid: str) -> None:
        """The engine delivered the period's last chunk: schedule what the trace does next."""
        i = self._period.get(sid)
        if i is None:
            return
        rec = self._by_id[sid]
        self._active -= 1
        self.metrics.active_changed(now_s, self._active)
        watched_s = max(now_s, self._period_start[sid] + rec.chunks_in_period(i) * rec.spec.chunk_seconds)
        idle_s = rec.periods[i].idle_s
        if i + 1 < len(rec.periods):
            self._period[sid] = i + 1
            self.loop.push(watched_s + idle_s, (self._activate, sid))
        else:
            self.loop.push(watched_s + idle_s, (self._depart, sid))

    def _activate(self, now_s: float, sid: str) -> None:
        rec = self._by_id[sid]
        self._period_start[sid] = now_s
        self._active += 1
        self.metrics.active_changed(now_s, self._active)
        self.controller.on_event(SessionActivated(now_s, sid, chunks_wanted=rec.chunks_in_period(self._period[sid])))

    def _depart(self, now_s: float, sid: str) -> None:
        self._period.pop(sid, None)
        self._period_start.pop(sid, None)
        self._live -= 1
        self._left -= 1
        self.last_departure_s = now_s
        self.controller.on_event(SessionDeparted(now_s, sid))

    def _tick(self, now_s: float, _arg) -> None:
        self.controller.on_event(Tick(now_s))
        if self._left > 0:
            self.loop.push(now_s + self.config.sim.tick_s, (self._tick, None))

    def _handle(self, now_s: float, item) -> None:
        fn, arg = item
        fn(now_s, arg)
        transport = self.transport
        transport.flush(now_s)

    # ------------------------------------------------------------------ run
    def run(self, until_s: float | None = None, progress: bool = False) -> SimResult:
        loop = self.loop
        self.controller.bootstrap(0.0)
        self.transport.flush(0.0)
        for rec in sorted(self.records, key=lambda r: r.arrival_s):
            loop.push(rec.arrival_s, (self._arrive, rec))
        loop.push(0.0, (self._tick, None))
        horizon = until_s if until_s is not None else \
            nominal_end_s(self.records, self.metrics.slo_ms / 1000.0) + DRAIN_GRACE_S
        bar = _progress_bar(horizon, self.policy_name) if progress else None

        def show(t: float) -> None:
            bar.n = min(horizon, round(t, 1))
            bar.refresh()

        loop.run(self._handle, until_s=horizon, on_progress=show if bar is not None else None)
        if bar is not None:
            bar.n = bar.total
            bar.close()
        if self._left == 0:
            end_s = self.last_departure_s
        else:
            end_s = horizon
            # Cut short by --until: only chunks already late count (the rest may still
            # come in time). Past the drain horizon the sessions are starved: everything
            # they still owe counts as missed.
            starved = until_s is None
            late_ms = None if starved else self.metrics.slo_ms
            self.transport.record_unfinished(end_s, only_over_ms=late_ms)
            self._record_queued(end_s, late_ms)
            if starved:
                self._record_owed(end_s)
        self.metrics.set_decision_times(self.controller.decision_ms)
        summary = self.metrics.summary(end_s)
        summary["sessions"] = len(self.records)
        summary["sessions_unserved"] = self._left
        summary["sessions_failed"] = len(self.controller.failed)
        summary["rounds"] = self.transport.rounds
        summary["rounds_cruised"] = self.transport.cruised_rounds
        summary["refused_decisions"] = self.controller.counters.refused
        summary["prefetches"] = self.controller.counters.prefetches
        summary["duration_s"] = end_s
        return SimResult(self.policy_name, summary, self.metrics, end_s, self.controller, self.transport,
                         loop.handled)

    def _record_queued(self, end_s: float, only_over_ms: float | None) -> None:
        """Sessions waiting for a GPU at the end owe their next chunk since they queued."""
        view = self.controller.view(end_s)
        for sid in view.pending:
            sv = view.sessions[sid]
            waited_ms = (end_s - sv.last_change_s) * 1000.0
            if only_over_ms is None or waited_ms > only_over_ms:
                self.metrics.record_unfinished(waited_ms)

    def _record_owed(self, end_s: float) -> None:
        """Chunks a starved session never got beyond the one it waits for: this period's
        rest and every later period's, counted as missed (late by at least the wait)."""
        st = self.controller.state
        for sid, i in self._period.items():
            rec = self._by_id[sid]
            later = sum(rec.chunks_in_period(j) for j in range(i + 1, len(rec.periods)))
            rest = 0
            if st.has_session(sid) and st.is_active(sid):
                rest = max(0, st.chunks_wanted(sid) - 1)  # the due one is already counted
            owed = later + rest
            if owed:
                waited_ms = (end_s - self._period_start.get(sid, end_s)) * 1000.0
                self.metrics.record_unfinished(max(waited_ms, self.metrics.slo_ms + 1.0), owed)


def warm_start_gpus(records: list[SessionRecord], model: LatencyModel, config: TurboConfig,
                    shape: str | None = None) -> int:
    """Workers ready at t=0 for autoscaling policies: `autoscale.initial_gpus` when set,
    else the most GPUs the trace's nominal demand needs during its first start-up delay
    (perfect packing at the SLO, rounded up), clamped to [min_gpus, gpus]."""
    c = config.cluster
    lo = min(max(c.min_gpus, 0), c.gpus)
    if config.autoscale.initial_gpus > 0 or not records:
        n = config.autoscale.initial_gpus or lo
        return max(lo, min(c.gpus, n))
    from ..traces.rescale import demand_curve

    shape = shape or records[0].spec.model
    horizon_s = max(c.startup_delay_s, 0.0)
    peak = 0.0
    for t, gpus in demand_curve(records, model, shape, config.slo.slo_ms):
        if t > horizon_s:
            break
        peak = max(peak, gpus)
    return max(lo, min(c.gpus, math.ceil(peak - 1e-9)))


def simulate(records: list[SessionRecord], policy_name: str, model: LatencyModel, config: TurboConfig,
             *, until_s: float | None = None, progress: bool = False, shape: str | None = None,
             frames: bool = False, on_outcome: Callable | None = None, cruise: bool = True) -> SimResult:
    """Run one policy over the trace; see the module docstring. `cruise=False` runs every
    round through the heap (the reference the cruise shortcut is tested against).
    Autoscaling policies start warm (`warm_start_gpus`) unless `autoscale.initial_gpus` is set."""
    if config.autoscale.initial_gpus <= 0 and records:
        warm = warm_start_gpus(records, model, config, shape)
        config = replace(config, autoscale=replace(config.autoscale, initial_gpus=warm))
    driver = TraceDriver(records, policy_name, model, config, shape=shape, frames=frames,
                         on_outcome=on_outcome, cruise=cruise)
    return driver.run(until_s=until_s, progress=progress)


def _progress_bar(total_s: float, label: str):
    """A tqdm bar over simulated seconds, only on a terminal."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=round(total_s, 1), desc=f"simulate {label}", unit="sim-s", leave=False)
