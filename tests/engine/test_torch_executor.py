"""TorchExecutor under EngineCore with the real `tiny` model: a session's frames do not
depend on who it shares rounds with, on offload/resume, on in-process migration, or on a
failed migration; failures stay with the failing session.

Float32 on CPU: the model's batched linears are batch-invariant and attention is per
session (models/wan_causal/attention.py), so equality is exact (uint8 frames, torch.equal).
`tiny` has a 6-latent-frame window, so 8 chunks also cross the rolling-window eviction.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from turboserve.config import LINKS
from turboserve.engine.core import EngineCore, PoolFullError
from turboserve.engine.executor import RoundPlan
from turboserve.engine.migration import Migration
from turboserve.engine.torch_executor import DEVICE_TIER, HOST_TIER, ExecutorError, TorchExecutor
from turboserve.engine.transfer import DeviceTransfer
from turboserve.models.registry import load_generator

CHUNKS = 8
MEMORY = 2**32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CI box has 2 cores shared with other test processes; OpenMP's spinning threads
    # slow a contended run down >10x, one thread keeps it predictable.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gen(one_thread):
    return load_generator("tiny", device="cpu", seed=0)


class Clock:
    def __init__(self):
        self._t = itertools.count()

    def __call__(self) -> float:
        return float(next(self._t))


def engine(gen, wid: str, memory: int = MEMORY) -> EngineCore:
    return EngineCore(wid, TorchExecutor(gen, device="cpu"), memory_bytes=memory, max_batch=8)


def spec(gen, seed: int):
    return gen.default_spec().with_(seed=seed)


def drive(core: EngineCore, clock: Clock, frames: dict, *, rounds: int | None = None, until=None,
          batches: list | None = None) -> None:
    """Run rounds, appending every delivered chunk's frames to frames[sid]."""
    done = 0
    while core.has_due_work() and (rounds is None or done < rounds):
        if until is not None and until():
            return
        out = core.step(clock)
        assert out is not None and not out.failed, out
        for d in out.deliveries:
            frames.setdefault(d.session_id, []).append(d.frames)
        if batches is not None:
            batches.append(out.session_ids)
        done += 1


def solo(gen, seed: int, prompt: str, chunks: int = CHUNKS) -> list[np.ndarray]:
    core, clock, frames = engine(gen, "solo"), Clock(), {}
    core.add_session("x", spec(gen, seed), prompt, clock(), chunks_wanted=chunks)
    drive(core, clock, frames)
    assert len(frames["x"]) == chunks
    return frames["x"]


@pytest.fixture(scope="module")
def ref_a(gen):
    return solo(gen, 11, "a red kite over the sea")


def assert_same_video(got: list, want: list) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape == (4, 64, 64, 3) and g.dtype == np.uint8
        assert np.array_equal(g, w), f"chunk {i} differs (max diff {np.abs(g.astype(int) - w).max()})"


def test_frames_are_real_and_session_dependent(gen, ref_a):
    other = solo(gen, 12, "a red kite over the sea", chunks=2)
    assert not np.array_equal(other[1], ref_a[1]), "a different seed must give a different video"
    assert ref_a[3].std() > 1.0, "frames must carry content, not a constant"


def test_coalesced_with_other_cache_lengths_matches_solo(gen, ref_a):
    core, clock, frames = engine(gen, "w0"), Clock(), {}
    core.add_session("b", spec(gen, 2), "a city at night", clock())  # unbounded: keeps running
    drive(core, clock, frames, rounds=3)  # b is 3 chunks ahead: a longer cache than a
    core.add_session("a", spec(gen, 11), "a red kite over the sea", clock(), chunks_wanted=CHUNKS)
    batches: list = []
    drive(core, clock, frames, rounds=2, batches=batches)
    core.add_session("c", spec(gen, 3), "a forest", clock(), chunks_wanted=CHUNKS)  # a third cache length
    drive(core, clock, frames, until=lambda: len(frames.get("a", [])) == CHUNKS, batches=batches)
    assert all(len(b) >= 2 for b in batches) and any(len(b) == 3 for b in batches), batches
    assert_same_video(frames["a"], ref_a)


def test_offload_and_resume_matches_solo(gen, ref_a):
    core, clock, frames = engine(gen, "w0"), Clock(), {}
    ex: TorchExecutor = core.executor
    core.add_session("a", spec(gen, 11), "a red kite over the sea", clock(), chunks_wanted=CHUNKS)
    core.add_session("b", spec(gen, 2), "a city at night", clock())
    drive(core, clock, frames, rounds=3)
    before = ex.device_bytes()
    result = core.offload("a")
    assert result.nbytes == ex.state_bytes("a") > 0
    assert ex.tier("a") == HOST_TIER and ex.device_bytes() == before - result.nbytes
    assert ex.host_bytes() == result.nbytes
    drive(core, clock, frames, rounds=2)  # b runs alone meanwhile
    assert len(frames["a"]) == 3
    core.restore("a", clock())
    assert ex.tier("a") == DEVICE_TIER and ex.host_bytes() == 0
    # a second cycle reuses the recycled buffers of the first
    drive(core, clock, frames, rounds=1)
    core.offload("a")
    core.restore("a", clock())
    drive(core, clock, frames, until=lambda: len(frames["a"]) == CHUNKS)
    assert_same_video(frames["a"], ref_a)


def test_in_process_migrations_match_solo(gen, ref_a):
    """There and back: a device copy to another engine, then a zero-copy handoff back (two
    engines sharing one device), each at a chunk boundary between rounds."""
    src, dst, clock, frames = engine(gen, "w0"), engine(gen, "w1"), Clock(), {}
    src.add_session("a", spec(gen, 11), "a red kite over the sea", clock(), chunks_wanted=CHUNKS)
    src.add_session("b", spec(gen, 2), "a city at night", clock())
    dst.add_session("c", spec(gen, 3), "a forest", clock())
    drive(src, clock, frames, rounds=3)
    drive(dst, clock, frames, rounds=1)
    old = dict(src.executor.stream_state("a").tensors)
    copy = DeviceTransfer("cpu", always_copy=True)
    report = Migration("a", src, dst, link=LINKS["nvlink"], transfer=copy).run(clock())
    assert report.ok and copy.last_copied, report
    assert "a" not in src and "a" in dst and not src.executor.has_session("a")
    moved = dst.executor.stream_state("a").tensors
    assert set(moved) == set(old)
    for k, t in moved.items():  # a real copy: nothing aliases the source's memory
        assert torch.equal(t, old[k])
        assert t.numel() == 0 or t.data_ptr() != old[k].data_ptr()
    assert copy.last_nbytes == dst.executor.state_bytes("a")
    drive(dst, clock, frames, until=lambda: len(frames["a"]) == 5)

    old = dict(dst.executor.stream_state("a").tensors)
    back = DeviceTransfer("cpu")
    report = Migration("a", dst, src, link=LINKS["nvlink"], transfer=back).run(clock())
    assert report.ok and not back.last_copied, "same device: the state is handed off, not copied"
    assert all(t.data_ptr() == old[k].data_ptr() for k, t in src.executor.stream_state("a").tensors.items())
    drive(src, clock, frames, until=lambda: len(frames["a"]) == CHUNKS)
    assert_same_video(frames["a"], ref_a)


def test_failed_migrations_leave_the_session_running_on_its_source(gen, ref_a):
    src, clock, frames = engine(gen, "w0"), Clock(), {}
    full = engine(gen, "w1", memory=1024)  # cannot hold the state
    ok_dst = engine(gen, "w2")
    src.add_session("a", spec(gen, 11), "a red kite over the sea", clock(), chunks_wanted=CHUNKS)
    drive(src, clock, frames, rounds=2)

    report = Migration("a", src, full, link=LINKS["nvlink"], transfer=DeviceTransfer("cpu")).run(clock())
    assert not report.ok and report.reason == "dst_no_memory"
    drive(src, clock, frames, rounds=1)

    def broken(blob):
        raise RuntimeError("link down")

    mig = Migration("a", src, ok_dst, link=LINKS["nvlink"], transfer=broken)
    report = mig.run(clock())
    assert not report.ok and report.reason == "transfer_failed" and "link down" in mig.reason_detail
    assert "a" in src and "a" not in ok_dst and not ok_dst.executor.has_session("a")
    assert not src.info("a").held and ok_dst.pool.reserved_for("a") == 0
    drive(src, clock, frames, until=lambda: len(frames["a"]) == CHUNKS)
    assert_same_video(frames["a"], ref_a)


def _plan(ex: TorchExecutor, sids, key) -> RoundPlan:
    return RoundPlan("w", key, tuple(sids), tuple(ex.next_chunk_index(s) for s in sids), (0,) * len(sids))


def test_a_session_failing_mid_round_does_not_harm_the_others(gen):
    want = {sid: solo(gen, seed, f"prompt {sid}", chunks=2) for sid, seed in (("p", 21), ("q", 22), ("r", 23))}
    ex = TorchExecutor(gen, device="cpu")
    for sid, seed in (("p", 21), ("bad", 99), ("q", 22), ("r", 23)):
        ex.add_session(sid, spec(gen, seed), f"prompt {sid}")
    key = spec(gen, 0).compat_key
    first = ex.execute(_plan(ex, ["p", "bad", "q", "r"], key))
    assert not first.errors and len(first.outputs) == 4
    # Corrupt one state so that the family fails after earlier sessions of the batch have
    # already been advanced (it writes caches session by session at the round's end).
    ex.stream_state("bad").tensors["latents"] = torch.zeros(3, 0, 8, 8)
    second = ex.execute(_plan(ex, ["p", "bad", "q", "r"], key))
    assert set(second.errors) == {"bad"} and "RuntimeError" in second.errors["bad"]
    got = {o.session_id: o for o in second.outputs}
    assert set(got) == {"p", "q", "r"}
    for sid in ("p", "q", "r"):
        assert got[sid].chunk_index == 1 and ex.next_chunk_index(sid) == 2
        assert np.array_equal(first.outputs[[o.session_id for o in first.outputs].index(sid)].frames, want[sid][0])
        assert np.array_equal(got[sid].frames, want[sid][1]), f"{sid} was disturbed by the failing session"


def test_executor_refuses_what_it_cannot_do(gen):
    ex = TorchExecutor(gen, device="cpu")
    ex.add_session("a", spec(gen, 1), "x")
    key = spec(gen, 0).compat_key
    with pytest.raises(ExecutorError, match="already exists"):
        ex.add_session("a", spec(gen, 1), "x")
    with pytest.raises(ExecutorError, match="unknown session"):
        ex.offload("nope")
    with pytest.raises(ValueError, match="spec.width"):
        ex.add_session("w", spec(gen, 1).with_(width=70), "x")
    ex.offload("a")
    res = ex.execute(_plan(ex, ["a"], key))
    assert "offloaded" in res.errors["a"] and not res.outputs
    ex.restore("a")
    res = ex.execute(RoundPlan("w", key, ("a",), (5,), (0,)))
    assert "chunk 5" in res.errors["a"]
    blob = ex.export_state("a")
    with pytest.raises(ExecutorError, match="already exists"):
        ex.import_state(blob)
    blob.payload = None
    ex.remove_session("a")
    with pytest.raises(ExecutorError, match="not a StreamState"):
        ex.import_state(blob)


def test_rebuild_from_checkpoint(gen, ref_a):
    """Before the window first evicts a frame the rebuilt state is exact; after it the
    family re-caches from the retained frames only (LongLive-style) and the video continues
    close to, not equal to, the original (models/wan_causal/generator.py)."""
    for chunks_before, exact in ((3, True), (7, False)):
        core, clock, frames = engine(gen, "w0"), Clock(), {}
        core.add_session("a", spec(gen, 11), "a red kite over the sea", clock(), chunks_wanted=chunks_before)
        drive(core, clock, frames)
        ckpt = core.executor.checkpoint("a")
        assert ckpt.nbytes() < core.executor.state_bytes("a")
        ex2 = TorchExecutor(gen, device="cpu")
        nbytes = ex2.rebuild("a", ckpt)
        assert nbytes > 0 and ex2.next_chunk_index("a") == chunks_before
        key = spec(gen, 0).compat_key
        rest = []
        while ex2.next_chunk_index("a") < CHUNKS:
            res = ex2.execute(_plan(ex2, ["a"], key))
            assert not res.errors
            rest.append(res.outputs[0].frames)
        got = frames["a"] + rest
        if exact:
            assert_same_video(got, ref_a)
        else:
            assert_same_video(got[:chunks_before], ref_a[:chunks_before])
            diff = np.abs(np.stack(got[chunks_before:]).astype(float) - np.stack(ref_a[chunks_before:])).mean()
            assert diff < 8.0, f"mean abs pixel difference {diff:.2f} after a re-cache rebuild"


def test_helios_tiny_coalesced_offloaded_and_migrated_matches_solo():
    """The other family (state = latent history, no KV cache) through the same mechanisms:
    coalesced with a session of a different age, offloaded and restored, then moved to
    another engine by a device copy."""
    hgen = load_generator("helios-tiny", device="cpu", seed=0)
    chunks = 5
    want = solo(hgen, 7, "a lighthouse", chunks=chunks)
    src, dst, clock, frames = engine(hgen, "h0"), engine(hgen, "h1"), Clock(), {}
    src.add_session("old", spec(hgen, 8), "waves", clock())
    drive(src, clock, frames, rounds=2)
    src.add_session("a", spec(hgen, 7), "a lighthouse", clock(), chunks_wanted=chunks)
    batches: list = []
    drive(src, clock, frames, rounds=2, batches=batches)
    assert all(len(b) == 2 for b in batches)
    src.offload("a")
    drive(src, clock, frames, rounds=1)
    src.restore("a", clock())
    drive(src, clock, frames, rounds=1)
    report = Migration("a", src, dst, link=LINKS["nvlink"], transfer=DeviceTransfer("cpu", always_copy=True)).run(clock())
    assert report.ok, report
    drive(dst, clock, frames, until=lambda: len(frames["a"]) == chunks)
    assert_same_video(frames["a"], want)


def test_the_pool_books_state_as_the_caches_grow(gen):
    """The KV and VAE caches fill chunk by chunk: after every round the engine's pool holds
    what the executor's states really take, and once they outgrow the memory the engine
    admits nothing more (the pool books growth that already happened, past capacity)."""
    core, clock, frames = engine(gen, "w0"), Clock(), {}
    ex: TorchExecutor = core.executor
    core.add_session("a", spec(gen, 1), "a red kite", clock())
    core.add_session("b", spec(gen, 2), "a city at night", clock())
    start = core.pool.gpu_bytes
    assert start == ex.device_bytes()
    drive(core, clock, frames, rounds=3)
    assert core.pool.gpu_bytes == ex.device_bytes() == ex.state_bytes("a") + ex.state_bytes("b") > start
    assert core.info("a").state_bytes == ex.state_bytes("a")
    # offload and restore move the grown size between the tiers
    core.offload("a")
    assert core.pool.host_bytes == ex.state_bytes("a") and core.pool.gpu_bytes == ex.state_bytes("b")
    core.restore("a", clock())
    # a small device: two sessions fit when they start, then their caches outgrow it
    small = engine(gen, "w1", memory=2 * start)
    small.add_session("a", spec(gen, 1), "a red kite", clock())
    small.add_session("b", spec(gen, 2), "a city at night", clock())
    drive(small, clock, {}, rounds=2)
    assert small.pool.gpu_bytes > small.pool.capacity_bytes and small.pool.free_bytes < 0
    with pytest.raises(PoolFullError):
        small.add_session("c", spec(gen, 3), "a third", clock())
