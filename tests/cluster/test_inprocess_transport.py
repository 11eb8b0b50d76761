"""InProcessTransport keeps the Transport contract: events for completions, no exceptions
for vanished sessions or workers, host copies that outlive their worker."""

from __future__ import annotations

from turboserve.cluster.inprocess import InProcessTransport
from turboserve.cluster.transport import Transport
from turboserve.config import TurboConfig
from turboserve.events import (MigrationFinished, OffloadFinished, RestoreFinished, RoundCompleted,
                               SessionFailed, SessionPaused, WorkerReady)
from turboserve.profile import load_latency_model
from turboserve.types import SessionSpec

MODEL = load_latency_model()
CFG = TurboConfig()
SPEC = SessionSpec(model="demo91")
GB = 10**9


def setup(auto_ready=True):
    tr = InProcessTransport(MODEL, CFG, auto_ready=auto_ready)
    events = []
    tr.bind(events.append)
    return tr, events


def test_is_a_transport_and_emits_worker_ready():
    tr, ev = setup(auto_ready=False)
    assert isinstance(tr, Transport)
    tr.start_worker("w0", 0.0, memory_bytes=10 * GB)
    assert ev == []
    tr.make_ready("w0", 5.0)
    assert ev == [WorkerReady(5.0, "w0")]


def test_rounds_emit_completion_idle_and_failure_events():
    tr, ev = setup()
    tr.start_worker("w0", 0.0, memory_bytes=10 * GB)
    tr.place("a", SPEC, "p", "w0", 0.0, from_host=False, active=True, chunks_wanted=1)
    tr.place("b", SPEC, "p", "w0", 0.0, from_host=False, active=True, chunks_wanted=0)
    tr.engines["w0"].executor.inject_failure("b", "oops")
    ev.clear()
    out = tr.run_round("w0")
    assert ev == [RoundCompleted(out.finished_s, "w0", ("a",), out.duration_ms),
                  SessionPaused(out.finished_s, "a"), SessionFailed(out.finished_s, "b", "oops", "w0")]


def test_offloaded_state_moves_to_another_worker_and_survives_release():
    tr, ev = setup()
    for w in ("w0", "w1", "w2"):
        tr.start_worker(w, 0.0, memory_bytes=10 * GB)
    tr.place("a", SPEC, "p", "w0", 0.0, from_host=False, active=True, chunks_wanted=2)
    tr.run_until(5.0)
    tr.offload("a", "w0", 5.0)
    assert isinstance(ev[-1], OffloadFinished) and ev[-1].bytes_moved > 0
    tr.place("a", SPEC, "p", "w1", 6.0, from_host=True, active=True, chunks_wanted=1)
    assert isinstance(ev[-1], RestoreFinished) and "a" not in tr.engines["w0"]
    tr.run_until(7.0, 6.0)
    assert tr.engines["w1"].info("a").chunk_index == 3
    tr.offload("a", "w1", 7.0)
    tr.release_worker("w1", 7.5)  # the host copy stays with the transport
    tr.place("a", SPEC, "p", "w2", 8.0, from_host=True, active=True, chunks_wanted=1)
    out = tr.run_round("w2", 8.0)
    assert out.chunk_indices == (3,)


def test_vanished_targets_become_events_not_exceptions():
    tr, ev = setup()
    tr.start_worker("w0", 0.0, memory_bytes=10 * GB)
    tr.place("a", SPEC, "p", "w0", 0.0, from_host=False, active=True, chunks_wanted=0)
    tr.migrate("a", "w0", "gone", 1.0)
    assert ev[-1] == MigrationFinished(1.0, "a", "w0", "gone", False, reason="dst_lost")
    tr.migrate("zz", "w0", "gone", 1.0)
    assert ev[-1].reason == "src_lost"
    tr.place("b", SPEC, "p", "gone", 1.0, from_host=False, active=True, chunks_wanted=0)
    assert isinstance(ev[-1], SessionFailed)
    tr.place("c", SPEC, "p", "w0", 1.0, from_host=True, active=True, chunks_wanted=0)
    assert isinstance(ev[-1], SessionFailed) and "no host copy" in ev[-1].reason
    tr.pause("zz", "w0", 1.0)
    tr.activate("zz", "w9", 1.0, 0)
    tr.close("zz", None, 1.0)
    tr.close("a", "w0", 2.0)
    assert not tr.engines["w0"].table and tr.engines["w0"].pool.used_bytes == 0
