"""The Ray transport on a local Ray (CPU actors, 0 GPUs): workers are actors, the real
controller and policy drive them, sessions migrate between actor processes through the
object store, go to host memory and come back, and chunks arrive once each, in order.
Engines run the fake generator (the real protocol, no model load per actor)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
import serving_helpers  # noqa: E402
from serving_helpers import FakeGenerator, tiny_latency_model  # noqa: E402

from turboserve.config import TurboConfig  # noqa: E402
from turboserve.profile.calibrate import RoundRecorder, read_timed_rounds  # noqa: E402
from turboserve.serving.embedded import build_runtime  # noqa: E402
from turboserve.types import SessionSpec, SessionState  # noqa: E402

from test_runtime_live import Collector, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    # the actors' processes cannot import the tests' helper module: ship it by value
    ray.cloudpickle.register_pickle_by_value(serving_helpers)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.mark.slow  # ~20 s: Ray start-up and two actor processes
def test_ray_workers_run_migrate_offload_resume(local_ray, tmp_path):
    cfg = TurboConfig().with_overrides([
        f"serve.storage_dir='{tmp_path}'", "sim.tick_s=0.2", "offload.grace_s=0.3",
        "rebalance.cooldown_s=0.5", "rebalance.gain_threshold_ms=1.0", "rebalance.eta=0.1",
        "cluster.gpus=2", "cluster.min_gpus=2",
    ])
    model = tiny_latency_model()
    rt = build_runtime(cfg, backend="ray", workers=2, latency_model=model,
                       generator_factory=lambda device: FakeGenerator(device, delay_s=0.02))
    col = Collector()
    rt.add_listener(col.on_chunk, col.on_end)
    rounds_file = tmp_path / "rounds.jsonl"
    recorder = RoundRecorder(rounds_file, model)  # what `turboserve serve --record-rounds` adds
    rt.add_round_listener(recorder)
    rt.start()
    try:
        spec = rt.resolve_spec({})
        sids = [f"r{i}" for i in range(4)]
        for sid in sids:
            rt.create_session(sid, spec, f"prompt {sid}")
        wait_for(lambda: all(len(col.indices[s]) >= 2 for s in sids), 60, "first chunks")
        assert {w.device for w in rt.cluster().workers} == {"ray:cpu"}
        wait_for(lambda: len({rt.session(s).worker for s in sids}) == 2, 30, "sessions on both actors")
        placed = {s: rt.session(s).worker for s in sids}
        paused = [s for s in sids if placed[s] == placed[sids[0]]]
        for sid in paused:
            rt.pause(sid)
        wait_for(lambda: rt.cluster().counters["offloads"] >= 1, 30, "an offload")
        wait_for(lambda: rt.cluster().counters["migrations"] >= 1, 60, "a migration between actors")
        before = len(col.indices[paused[0]])
        wait_for(lambda: rt.session(paused[0]).state is SessionState.OFFLOADED, 30, "offloaded")
        rt.resume(paused[0], chunks=3)
        wait_for(lambda: len(col.indices[paused[0]]) >= before + 3, 30, "chunks after resume")
        for sid in sids:
            rt.close(sid)
        for sid in sids:
            idx = col.indices[sid]
            assert idx == list(range(len(idx))), f"{sid}: {idx}"
        assert rt.cluster().counters["resumes"] >= 1
    finally:
        rt.stop()
        recorder.close()
    # the actors' rounds reach the recorder as the local engines' do, with worker and time
    rounds, shared = read_timed_rounds(rounds_file, spec.model)
    assert len(rounds) >= sum(len(v) for v in col.indices.values()) / 4  # rounds batch up to 4 sessions
    assert shared is not None and len(shared) == len(rounds)
    workers = {json.loads(line)["worker"] for line in rounds_file.read_text().splitlines()}
    assert len(workers) == 2


@pytest.mark.slow  # two more actor processes
def test_a_resume_sent_while_the_state_is_on_its_way_is_not_lost(local_ray):
    """Restored idle onto another actor (a prefetch), then resumed before it landed: the
    resume waits for the landing."""
    import threading
    import time

    from turboserve.cluster.ray_transport import RayTransport
    from turboserve.events import OffloadFinished, RestoreFinished, SessionPaused

    chunks: list[tuple[str, int]] = []
    events = []
    lock = threading.Lock()

    def on_round(wid, outcome):
        with lock:
            chunks.extend((wid, i) for i in outcome.chunk_indices)

    def seen(kind):
        with lock:
            return [e for e in events if isinstance(e, kind)]

    t = RayTransport(lambda device: FakeGenerator(device, delay_s=0.01), slots=2, gpus_per_worker=0,
                     model=tiny_latency_model(), on_round=on_round)
    t.bind(lambda e: events.append(e))
    try:
        for wid in ("w0", "w1"):
            t.start_worker(wid, 0.0, memory_bytes=64 << 20, ready=True)
        spec = SessionSpec(model="tiny", width=32, height=32, fps=16.0, frames_per_chunk=4, steps=4)
        t.place("a", spec, "p", "w0", 0.0, from_host=False, active=True, chunks_wanted=2)
        wait_for(lambda: seen(SessionPaused), 60, "idle after two chunks")
        t.offload("a", "w0", 1.0)
        wait_for(lambda: seen(OffloadFinished), 60, "the offload")
        t.place("a", spec, "p", "w1", 2.0, from_host=True, active=False, chunks_wanted=0)
        t.activate("a", "w1", 2.0, chunks_wanted=3)  # before the restore has landed
        wait_for(lambda: seen(RestoreFinished) and len(chunks) >= 5, 60, "chunks after the resume")
        time.sleep(0.2)
        with lock:
            assert [i for _, i in chunks] == [0, 1, 2, 3, 4] and chunks[-1][0] == "w1"
    finally:
        t.shutdown()
