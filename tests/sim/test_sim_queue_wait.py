"""A session that waits for a GPU owes its first chunk from the moment it wanted it: the
wait is part of that chunk's latency, never hidden by starting the clock at placement."""

from __future__ import annotations

from turboserve.config import TurboConfig
from turboserve.profile import load_latency_model
from turboserve.sim.driver import simulate
from turboserve.types import Period, SessionRecord, SessionSpec

SHAPE = "wan1.3b-480p"  # 6 GB of KV per session at a full window: ~11 fit on one H100


def test_queue_wait_counts_in_first_chunk_latency():
    spec = SessionSpec(model=SHAPE, fps=16, frames_per_chunk=12, steps=4)
    records = [SessionRecord(f"s{i}", 0.0, spec, (Period(active_s=1.5),)) for i in range(14)]
    config = TurboConfig().with_overrides(["cluster.gpus=1", "slo.slo_ms=60000", "sim.progress=false"])
    rounds = []
    result = simulate(records, "static-ll", load_latency_model(), config,
                      on_outcome=lambda outcome, *_: rounds.append(outcome))
    first_chunk = {}  # session -> (due_s, delivered_s) of its first chunk
    for r in rounds:
        for sid, due_s in zip(r.session_ids, r.due_s):
            first_chunk.setdefault(sid, (due_s, r.finished_s))
    assert len(first_chunk) == 14  # everyone was served in the end
    waited = [sid for sid, (_, done) in first_chunk.items() if done > rounds[0].finished_s + 5.0]
    assert waited, "the scenario must make some sessions wait for memory"
    for sid in waited:
        due_s, done_s = first_chunk[sid]
        assert due_s == 0.0  # due since arrival, not since placement
    worst_wait_s = max(first_chunk[sid][1] for sid in waited)
    assert result.summary["max_chunk_latency_ms"] >= worst_wait_s * 1000.0 - 1e-6
