"""The live closed loop on the real `tiny` model: two CPU engines in threads, the real
Controller and `turboserve` policy. Sessions really migrate, go to host memory and come
back, and every session's chunks arrive once each and in order throughout."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import numpy as np
import pytest

from turboserve.config import TurboConfig
from turboserve.serving.embedded import build_runtime
from turboserve.types import SessionState

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))
from serving_helpers import tiny_latency_model  # noqa: E402


class Collector:
    def __init__(self):
        self.lock = threading.Lock()
        self.indices = defaultdict(list)
        self.workers = defaultdict(list)
        self.frames = defaultdict(list)
        self.ends = {}

    def on_chunk(self, d):
        with self.lock:
            self.indices[d.session_id].append(d.chunk_index)
            self.workers[d.session_id].append(d.worker)
            self.frames[d.session_id].append(d.frames.shape)

    def on_end(self, sid, state, reason):
        self.ends[sid] = (state, reason)


def wait_for(pred, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def runtime(tmp_path):
    cfg = TurboConfig().with_overrides([
        f"serve.storage_dir='{tmp_path}'", "sim.tick_s=0.2", "offload.grace_s=0.3",
        "rebalance.cooldown_s=0.5", "rebalance.gain_threshold_ms=1.0", "rebalance.eta=0.1",
        "cluster.gpus=2", "cluster.min_gpus=2",  # both engines from the start
    ])
    rt = build_runtime(cfg, model="tiny", policy="turboserve", workers=2,
                       latency_model=tiny_latency_model(), warmup_chunks=1)
    col = Collector()
    rt.add_listener(col.on_chunk, col.on_end)
    rt.start()
    rt.collector = col
    yield rt
    rt.stop()


def test_live_loop_migrates_offloads_and_resumes(runtime):
    col = runtime.collector
    spec = runtime.resolve_spec({})
    assert spec.model == "tiny"
    sids = [f"s{i}" for i in range(4)]
    for sid in sids:
        runtime.create_session(sid, spec, f"prompt {sid}")
    wait_for(lambda: all(len(col.indices[s]) >= 2 for s in sids), 60, "first chunks")
    placed = {sid: runtime.session(sid).worker for sid in sids}
    assert set(placed.values()) == {"w0", "w1"}, f"placement should spread sessions: {placed}"
    # Pause everything on one worker: the other now holds all the active load, so the
    # min-max rebalance moves a session over; the idle ones go to host memory.
    idle_worker = placed[sids[0]]
    paused = [s for s in sids if placed[s] == idle_worker]
    for sid in paused:
        runtime.pause(sid)
    wait_for(lambda: runtime.cluster().counters["offloads"] >= 1, 30, "an offload")
    wait_for(lambda: runtime.cluster().counters["migrations"] >= 1, 60, "a migration")
    info = runtime.cluster()
    assert any(m.ok and m.bytes_moved > 0 for m in info.migrations)
    moved = {m.session_id for m in info.migrations if m.ok} - set(paused)
    print("migrations", info.migrations, "paused", paused, "placed", placed)
    for sid in moved:  # a migrated session keeps streaming from its new worker
        n = len(col.indices[sid])
        wait_for(lambda: len(col.indices[sid]) >= n + 2, 30, f"chunks of {sid} after its migration")
    assert runtime.session(paused[0]).state is SessionState.OFFLOADED
    # Resume from host memory: placement restores it, and it continues its own video.
    before = len(col.indices[paused[0]])
    runtime.resume(paused[0], chunks=3)
    wait_for(lambda: len(col.indices[paused[0]]) >= before + 3, 30, "chunks after resume")
    wait_for(lambda: runtime.session(paused[0]).state in (SessionState.IDLE, SessionState.OFFLOADED),
             10, "idle after its 3 chunks")
    assert runtime.cluster().counters["resumes"] >= 1
    for sid in sids:
        runtime.close(sid)
    with col.lock:
        for sid in sids:
            idx = col.indices[sid]
            assert idx == list(range(len(idx))), f"{sid}: chunks out of order or repeated: {idx}"
            assert all(shape == (4, 64, 64, 3) for shape in col.frames[sid])
    assert {col.ends[s][0] for s in sids} == {"closed"}
    # Everything went back: no sessions left on any worker
    wait_for(lambda: all(not w.sessions for w in runtime.cluster().workers), 10, "empty workers")
    assert np.isfinite(runtime.cluster().cost_usd) and runtime.cluster().cost_usd > 0


def test_autoscaling_enables_and_disables_local_engines(tmp_path):
    """Demand beyond one engine's capacity starts the second engine (a real engine is built
    in the free device slot); when the sessions end, the policy releases it again."""
    from serving_helpers import FakeGenerator

    model = tiny_latency_model()
    window = model.shape("tiny").window_frames
    # an SLO at which one engine holds exactly 2 sessions of tiny at a full window
    slo_ms = model.round_ms("tiny", 2, window, 4) + 2 * model.fixed_ms("tiny") + 1.0
    assert model.capacity("tiny", slo_ms, 4) == 2
    cfg = TurboConfig().with_overrides([
        f"serve.storage_dir='{tmp_path}'", "sim.tick_s=0.2", f"slo.slo_ms={slo_ms}",
        "cluster.gpus=2", "cluster.min_gpus=1", "autoscale.scale_in_hold_s=1.0",
        "autoscale.volatility_window_s=2.0",
    ])
    rt = build_runtime(cfg, policy="turboserve", workers=2, latency_model=model,
                       generator_factory=lambda device: FakeGenerator(device, width=64, height=64, delay_s=0.005))
    col = Collector()
    rt.add_listener(col.on_chunk, col.on_end)
    rt.start()
    try:
        assert rt.cluster().gpus_provisioned == 1
        spec = rt.resolve_spec({})
        sids = [f"a{i}" for i in range(4)]
        for sid in sids:
            rt.create_session(sid, spec, "p")
        wait_for(lambda: rt.cluster().gpus_ready == 2, 30, "a second engine")
        wait_for(lambda: len({rt.session(s).worker for s in sids} - {None}) == 2, 30, "sessions on both engines")
        for sid in sids:
            rt.close(sid)
        wait_for(lambda: rt.cluster().gpus_provisioned == 1, 30, "the second engine released")
        info = rt.cluster()
        assert info.counters["releases"] >= 1 and info.counters["scale_outs"] >= 2
        assert len(rt.transport.worker_devices()) == 1  # the engine thread really stopped
    finally:
        rt.stop()


def test_admission_is_bounded_and_a_refusal_leaves_no_trace(tmp_path):
    from serving_helpers import FakeGenerator

    from turboserve.cluster.runtime import CapacityError, UnknownSession

    cfg = TurboConfig().with_overrides([f"serve.storage_dir='{tmp_path}'", "serve.max_sessions=1"])
    rt = build_runtime(cfg, workers=1, latency_model=tiny_latency_model(),
                       generator_factory=lambda device: FakeGenerator(device, width=64, height=64))
    rt.start()
    try:
        spec = rt.resolve_spec({})
        rt.create_session("one", spec, "p", max_chunks=2)
        with pytest.raises(CapacityError, match="serve.max_sessions"):
            rt.create_session("two", spec, "p")
        with pytest.raises(UnknownSession):
            rt.session("two")
        rt.close("one")
        assert rt.create_session("three", spec, "p").state in (SessionState.QUEUED, SessionState.ACTIVE)
    finally:
        rt.stop()
