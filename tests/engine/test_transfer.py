"""State transfers: in-process copies, and migration to another process over gloo.

The cross-process test spawns two ranks. Rank 0 runs a `tiny` session for 3 chunks on its
engine, exports it at the chunk boundary and streams it in small pieces; rank 1 imports it
into its own engine and continues. Rank 1's frames must equal the solo run's chunks 3..7
exactly. Then rank 1 refuses a second session: rank 0's send fails and that session keeps
running on its source.
"""

from __future__ import annotations

import datetime
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from turboserve.engine.executor import SessionBlob
from turboserve.engine.transfer import DeviceTransfer, TransferError, device_copy
from turboserve.models.base import StreamState
from turboserve.types import SessionSpec

CHUNKS_BEFORE, CHUNKS = 3, 8
PROMPT = "a red kite over the sea"


def _blob(tensors: dict, meta: dict | None = None) -> SessionBlob:
    spec = SessionSpec(model="tiny", seed=5)
    st = StreamState("s", spec, "p", chunk_index=4, tensors=tensors, meta=meta or {"k": [1, 2]})
    return SessionBlob("s", spec, "p", 4, st.nbytes(), st)


def test_device_copy_is_an_independent_exact_copy():
    src = {
        "kv": torch.randn(2, 3, 5, dtype=torch.bfloat16),
        "empty": torch.empty(2, 0, 4),
        "rng": torch.randint(0, 255, (16,), dtype=torch.uint8),
        "flags": torch.tensor([True, False]),
        "strided": torch.randn(6, 4).t(),  # non-contiguous
    }
    blob = _blob(src)
    out = device_copy(blob, "cpu")
    assert out.nbytes == blob.nbytes and out.chunk_index == 4 and out.payload.meta == {"k": [1, 2]}
    for k, t in src.items():
        got = out.payload.tensors[k]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
        if t.numel():
            assert got.data_ptr() != t.data_ptr()
    out.payload.tensors["kv"].zero_()
    out.payload.meta["k"].append(3)
    assert src["kv"].abs().sum() > 0 and blob.payload.meta == {"k": [1, 2]}, "the source must be untouched"
    mover = DeviceTransfer("cpu", always_copy=True)
    moved = mover(blob)
    assert mover.last_copied and moved.nbytes == blob.nbytes and mover.last_nbytes == blob.nbytes
    assert moved.payload.tensors["kv"].data_ptr() != src["kv"].data_ptr()
    adopt = DeviceTransfer("cpu")
    handed = adopt(blob)
    assert not adopt.last_copied and handed.payload.tensors["kv"] is src["kv"], "same device: zero-copy handoff"
    assert handed.payload is not blob.payload and handed.payload.meta == blob.payload.meta
    with pytest.raises(TransferError, match="no StreamState"):
        device_copy(SessionBlob("s", blob.spec, "p", 0, 0, None), "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, results) -> None:
    try:
        _rank_body(rank, port, results)
    except BaseException:
        import traceback

        results.put(("error", rank, traceback.format_exc()))
        raise


def _rank_body(rank: int, port: int, results) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    from turboserve.engine.core import EngineCore
    from turboserve.engine.torch_executor import TorchExecutor
    from turboserve.engine.transfer import DistributedSendTransfer, ack, recv_blob, send_blob
    from turboserve.models.registry import load_generator

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=90))
    try:
        gen = load_generator("tiny", device="cpu", seed=0)
        core = EngineCore(f"w{rank}", TorchExecutor(gen, device="cpu"), memory_bytes=2**32, max_batch=8)
        clock = iter(range(10**6))
        spec = gen.default_spec()

        def step_all(n):
            got = []
            for _ in range(n):
                out = core.step(lambda: float(next(clock)))
                got.append({d.session_id: d.frames for d in out.deliveries})
            return got

        if rank == 0:
            core.add_session("a", spec.with_(seed=11), PROMPT, 0.0, chunks_wanted=CHUNKS)
            core.add_session("b", spec.with_(seed=2), "a city at night", 0.0)
            step_all(CHUNKS_BEFORE)
            core.hold("a")
            mover = DistributedSendTransfer(1, piece_bytes=64 * 1024)  # the source side's transfer()
            receipt = mover(core.export("a", keep=True))
            assert receipt.payload is None and receipt.chunk_index == CHUNKS_BEFORE
            sent = mover.last_nbytes
            core.remove("a")  # committed: the destination acknowledged
            core.hold("b")
            try:
                send_blob(core.export("b", keep=True), 1, piece_bytes=64 * 1024)
                refused = "no error"
            except TransferError as e:
                refused = str(e)
            core.unhold("b", 100.0)  # aborted: b runs on here
            after = step_all(1)
            results.put(("src", sent, refused, "b" in core, "a" in core, after[0]["b"].shape))
        else:
            blob = recv_blob(0, "cpu", piece_bytes=64 * 1024)
            core.import_session(blob, 0.0, active=True, chunks_wanted=CHUNKS - CHUNKS_BEFORE)
            ack(0, True)
            refused_blob = recv_blob(0, "cpu", piece_bytes=64 * 1024)
            ack(0, False)
            frames = [r["a"] for r in step_all(CHUNKS - CHUNKS_BEFORE)]
            results.put(("dst", blob.chunk_index, blob.nbytes, refused_blob.session_id, frames))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference_frames():
    from turboserve.engine.core import EngineCore
    from turboserve.engine.torch_executor import TorchExecutor
    from turboserve.models.registry import load_generator

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = load_generator("tiny", device="cpu", seed=0)
        core = EngineCore("ref", TorchExecutor(gen, device="cpu"), memory_bytes=2**32)
        core.add_session("a", gen.default_spec().with_(seed=11), PROMPT, 0.0, chunks_wanted=CHUNKS)
        frames, t = [], 0.0
        while core.has_due_work():
            t += 1
            frames += [d.frames for d in core.step(lambda: t).deliveries]
        return frames
    finally:
        torch.set_num_threads(before)


def test_migration_to_another_process_over_gloo(reference_frames):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.spawn(_rank_main, args=(_free_port(), results), nprocs=2, join=False)
    # Read before joining: a child cannot exit while its queued frames are still unread.
    try:
        got = {}
        for _ in range(2):
            r = results.get(timeout=120)
            assert r[0] != "error", f"rank {r[1]} failed:\n{r[2]}"
            got[r[0]] = r[1:]
    finally:
        while not procs.join(timeout=120):
            pass
    sent, refused, b_still_there, a_still_there, b_shape = got["src"]
    chunk_index, nbytes, refused_id, frames = got["dst"]
    assert chunk_index == CHUNKS_BEFORE and sent == nbytes > 64 * 1024, "the state must stream in pieces"
    assert not a_still_there, "a committed migration removes the session from its source"
    assert refused_id == "b" and "refused" in refused, refused
    assert b_still_there and b_shape == (4, 64, 64, 3), "a refused session keeps running on its source"
    assert len(frames) == CHUNKS - CHUNKS_BEFORE
    for i, (g, w) in enumerate(zip(frames, reference_frames[CHUNKS_BEFORE:])):
        assert np.array_equal(g, w), f"chunk {CHUNKS_BEFORE + i} differs after migration over gloo"
