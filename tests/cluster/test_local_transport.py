"""LocalTransport on its own: engine threads driven through the Transport protocol (no
controller), real EngineCores and TorchExecutors over the fake generator."""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from serving_helpers import FakeGenerator  # noqa: E402

from turboserve.cluster.local import LocalTransport  # noqa: E402
from turboserve.engine.torch_executor import TorchExecutor  # noqa: E402
from turboserve.events import (MigrationFinished, OffloadFinished, RestoreFinished,  # noqa: E402
                               RoundCompleted, SessionFailed, SessionPaused, WorkerLost, WorkerReady)
from turboserve.types import SessionSpec  # noqa: E402

SPEC = SessionSpec(model="tiny", width=32, height=32, fps=16.0, frames_per_chunk=4, steps=4)
MiB = 1 << 20


class Harness:
    def __init__(self, slots=2):
        self.t0 = time.monotonic()
        self.events = []
        self.chunks = defaultdict(list)  # sid -> [(worker, index)]
        self.lock = threading.Lock()
        self.transport = LocalTransport(
            lambda wid, dev: TorchExecutor(FakeGenerator(dev, delay_s=0.005), device=dev),
            ["cpu"] * slots, clock=self.now, on_round=self.on_round)
        self.transport.bind(self.emit)

    def now(self):
        return time.monotonic() - self.t0

    def emit(self, ev):
        with self.lock:
            self.events.append(ev)

    def on_round(self, wid, outcome):
        with self.lock:
            for sid, idx in zip(outcome.session_ids, outcome.chunk_indices):
                self.chunks[sid].append((wid, idx))

    def of(self, kind):
        with self.lock:
            return [e for e in self.events if isinstance(e, kind)]

    def wait(self, pred, what, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}; events: {self.events[-10:]}")

    def indices(self, sid):
        with self.lock:
            return [i for _, i in self.chunks[sid]]


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.transport.shutdown()


def test_rounds_events_and_period_end(h):
    t = h.transport
    t.start_worker("w0", h.now(), memory_bytes=64 * MiB, ready=True)
    assert [e.worker_id for e in h.of(WorkerReady)] == ["w0"]
    t.place("a", SPEC, "p", "w0", h.now(), from_host=False, active=True, chunks_wanted=5)
    h.wait(lambda: h.of(SessionPaused), "the period's end")
    assert h.indices("a") == [0, 1, 2, 3, 4]  # exactly the chunks wanted, then idle by itself
    assert sum(len(e.session_ids) for e in h.of(RoundCompleted)) == 5


def test_migration_moves_state_and_keeps_the_video_going(h):
    t = h.transport
    t.start_worker("w0", h.now(), memory_bytes=64 * MiB, ready=True)
    t.start_worker("w1", h.now(), memory_bytes=64 * MiB, ready=True)
    t.place("a", SPEC, "p", "w0", h.now(), from_host=False, active=True, chunks_wanted=0)
    h.wait(lambda: len(h.indices("a")) >= 3, "chunks on w0")
    t.migrate("a", "w0", "w1", h.now())
    h.wait(lambda: h.of(MigrationFinished), "the migration")
    m = h.of(MigrationFinished)[0]
    assert m.ok and m.bytes_moved > 0 and m.downtime_ms >= 0
    assert t.location("a") == "w1"
    h.wait(lambda: h.chunks["a"][-1][0] == "w1" and len(h.indices("a")) >= 8, "chunks on w1")
    idx = h.indices("a")
    assert idx == list(range(len(idx)))  # continued from the same chunk: no gap, no repeat
    t.close("a", "w1", h.now())


def test_migration_to_a_full_worker_aborts_and_the_session_runs_on(h):
    t = h.transport
    t.start_worker("w0", h.now(), memory_bytes=64 * MiB, ready=True)
    t.start_worker("w1", h.now(), memory_bytes=16, ready=True)  # no room for any state
    t.place("a", SPEC, "p", "w0", h.now(), from_host=False, active=True, chunks_wanted=0)
    h.wait(lambda: len(h.indices("a")) >= 2, "chunks")
    t.migrate("a", "w0", "w1", h.now())
    h.wait(lambda: h.of(MigrationFinished), "the abort")
    m = h.of(MigrationFinished)[0]
    assert not m.ok and m.reason == "dst_no_memory"
    n = len(h.indices("a"))
    h.wait(lambda: len(h.indices("a")) >= n + 3, "chunks after the abort")
    assert {w for w, _ in h.chunks["a"]} == {"w0"}
    assert h.indices("a") == list(range(len(h.indices("a"))))


def offloaded_after_two_chunks(h):
    """Workers w0 and w1; session "a" made two chunks on w0 and is now idle in host memory."""
    t = h.transport
    t.start_worker("w0", h.now(), memory_bytes=64 * MiB, ready=True)
    t.start_worker("w1", h.now(), memory_bytes=64 * MiB, ready=True)
    t.place("a", SPEC, "p", "w0", h.now(), from_host=False, active=True, chunks_wanted=2)
    h.wait(lambda: h.of(SessionPaused), "idle")
    t.offload("a", "w0", h.now())
    h.wait(lambda: h.of(OffloadFinished), "the offload")
    return t


def test_offload_then_resume_on_another_worker(h):
    t = offloaded_after_two_chunks(h)
    assert h.of(OffloadFinished)[0].bytes_moved > 0
    t.set_prompt("a", "a new prompt")  # applied when its state lands on a worker again
    t.place("a", SPEC, "p", "w1", h.now(), from_host=True, active=True, chunks_wanted=3)
    h.wait(lambda: h.of(RestoreFinished) and len(h.indices("a")) >= 5, "chunks after restore")
    assert h.of(RestoreFinished)[0].worker_id == "w1"
    assert h.indices("a") == [0, 1, 2, 3, 4] and h.chunks["a"][-1][0] == "w1"
    engine_prompt = t.call("w1", lambda e: e.info("a").prompt).result(5)
    assert engine_prompt == "a new prompt"


def test_an_idle_session_restored_ahead_runs_at_once_when_it_resumes(h):
    """A prefetch: the state of an idle offloaded session lands on a GPU while it stays idle
    (no chunk), and the session continues from there when it resumes."""
    t = offloaded_after_two_chunks(h)
    t.place("a", SPEC, "p", "w1", h.now(), from_host=True, active=False, chunks_wanted=0)
    h.wait(lambda: h.of(RestoreFinished), "the restore")
    assert h.of(RestoreFinished)[0].worker_id == "w1" and t.location("a") == "w1"
    time.sleep(0.1)
    assert h.indices("a") == [0, 1]  # restored idle: nothing generated
    t.activate("a", "w1", h.now(), chunks_wanted=3)
    h.wait(lambda: len(h.indices("a")) >= 5, "chunks after it resumed")
    assert h.indices("a") == [0, 1, 2, 3, 4] and h.chunks["a"][-1][0] == "w1"


def test_commands_sent_while_a_state_is_on_its_way_apply_when_it_lands(h):
    """An idle session resumes (or pauses) while its state is still being copied to its new
    worker: the command waits for the landing instead of missing the session."""
    t = offloaded_after_two_chunks(h)
    t.place("a", SPEC, "p", "w1", h.now(), from_host=True, active=False, chunks_wanted=0)
    t.activate("a", "w1", h.now(), chunks_wanted=3)  # before the restore has landed
    h.wait(lambda: len(h.indices("a")) >= 5, "chunks after it resumed")
    assert h.indices("a") == [0, 1, 2, 3, 4] and h.chunks["a"][-1][0] == "w1"
    t.offload("a", "w1", h.now())
    h.wait(lambda: len(h.of(OffloadFinished)) == 2, "the second offload")
    t.place("a", SPEC, "p", "w0", h.now(), from_host=True, active=True, chunks_wanted=0)
    t.pause("a", "w0", h.now())  # before it landed: it lands and stays idle
    h.wait(lambda: len(h.of(RestoreFinished)) == 2, "the second restore")
    time.sleep(0.2)
    assert len(h.indices("a")) <= 6  # at most the round already under way when the pause came
    t.offload("a", "w0", h.now())
    h.wait(lambda: len(h.of(OffloadFinished)) == 3, "the third offload")
    t.place("a", SPEC, "p", "w1", h.now(), from_host=True, active=False, chunks_wanted=0)
    t.offload("a", "w1", h.now())  # evicted again before it landed: the offload still comes
    h.wait(lambda: len(h.of(OffloadFinished)) == 4, "the offload sent while it was landing")
    t.place("a", SPEC, "p", "w0", h.now(), from_host=True, active=True, chunks_wanted=0)
    t.close("a", "w0", h.now())  # ended before it landed: nothing is left behind
    h.wait(lambda: len(h.of(RestoreFinished)) == 4, "the last restore")
    time.sleep(0.1)
    assert not any(t.call(w, lambda e: "a" in e).result(5) for w in ("w0", "w1"))


def test_slots_bound_workers_and_are_reused(h):
    t = h.transport
    t.start_worker("w0", h.now(), memory_bytes=MiB, ready=True)
    t.start_worker("w1", h.now(), memory_bytes=MiB, ready=False)  # built on its thread
    h.wait(lambda: len(h.of(WorkerReady)) == 2, "w1 ready")
    t.start_worker("w2", h.now(), memory_bytes=MiB, ready=False)  # no device left
    assert [e.worker_id for e in h.of(WorkerLost)] == ["w2"]
    t.release_worker("w1", h.now())
    h.wait(lambda: "w1" not in t.worker_devices(), "w1 released")
    t.start_worker("w3", h.now(), memory_bytes=MiB, ready=False)  # scale out into the freed slot
    h.wait(lambda: any(e.worker_id == "w3" for e in h.of(WorkerReady)), "w3 ready")
    assert sorted(t.worker_devices()) == ["w0", "w3"]


def test_a_failing_placement_is_reported_not_raised(h):
    t = h.transport
    t.start_worker("w0", h.now(), memory_bytes=MiB, ready=True)
    t.place("bad", SPEC.with_(width=48), "p", "w0", h.now(), from_host=False, active=True, chunks_wanted=0)
    h.wait(lambda: h.of(SessionFailed), "the failure")
    assert "width" in h.of(SessionFailed)[0].reason
    t.place("good", SPEC, "p", "w0", h.now(), from_host=False, active=True, chunks_wanted=2)
    h.wait(lambda: len(h.indices("good")) == 2, "the other session's chunks")


def test_releasing_a_worker_keeps_its_offloaded_sessions(h):
    t = h.transport
    t.start_worker("w0", h.now(), memory_bytes=64 * MiB, ready=True)
    t.start_worker("w1", h.now(), memory_bytes=64 * MiB, ready=True)
    t.place("a", SPEC, "p", "w1", h.now(), from_host=False, active=True, chunks_wanted=2)
    h.wait(lambda: h.of(SessionPaused), "idle")
    t.offload("a", "w1", h.now())
    h.wait(lambda: h.of(OffloadFinished), "the offload")
    t.release_worker("w1", h.now())  # holds no GPU-resident session: the policy may release it
    h.wait(lambda: "w1" not in t.worker_devices(), "w1 released")
    t.place("a", SPEC, "p", "w0", h.now(), from_host=True, active=True, chunks_wanted=2)
    h.wait(lambda: len(h.indices("a")) >= 4, "chunks after the restore")
    assert h.indices("a") == [0, 1, 2, 3] and h.chunks["a"][-1][0] == "w0"
    assert h.of(RestoreFinished)[0].worker_id == "w0" and not h.of(SessionFailed)
