"""Migration downtime per state size: in-process (device copy) and across processes (gloo).

Downtime is what the session waits between being held at a chunk boundary on the source
and being runnable on the destination:
- in-process: `Migration.stop_and_copy` + `commit` between two `EngineCore`s with
  `TorchExecutor`s on this device, data moved by `DeviceTransfer`: forced to copy (what
  GPU to GPU costs, here a host memcpy into fresh memory), and as the zero-copy handoff
  it does between engines that share a device;
- gloo: two processes (`torch.multiprocessing` spawn); the source exports and streams the
  state with `send_blob` (pieces of `--piece-mib`), the destination `recv_blob`s, imports
  it into its engine and acknowledges; downtime = export to acknowledgement on the source.
  (NCCL between GPUs is the same code with the nccl backend; this machine has no GPU when
  it says so below.)

Sessions are synthetic states of the given size (one KV-like tensor plus small ones)
imported as migrated sessions, so any size can be measured without generating it.

    python bench/migration.py [--sizes-mib 1,16,64,256] [--repeats 5] [--no-gloo]

Prints a table and writes JSON (`--json`, default bench/results/migration.json).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

from _common import (  # first: puts src/ on sys.path
    add_device_and_json, banner, describe_device, synthetic_tensors, write_results,
)

import torch
import torch.multiprocessing as mp

from turboserve.config import LINKS
from turboserve.engine.executor import SessionBlob
from turboserve.models.base import StreamState
from turboserve.types import SessionSpec

SPEC = SessionSpec(model="tiny", width=64, height=64, fps=16.0, frames_per_chunk=4, steps=4)


def synthetic_blob(sid: str, nbytes: int, device: str) -> SessionBlob:
    st = StreamState(sid, SPEC, "bench", chunk_index=3, tensors=synthetic_tensors(nbytes, device),
                     meta={"frame_pos": [0, 1, 2]})
    return SessionBlob(sid, SPEC, "bench", 3, st.nbytes(), st)


def _engines(gen, device: str):
    from turboserve.engine.core import EngineCore
    from turboserve.engine.torch_executor import TorchExecutor

    return [EngineCore(w, TorchExecutor(gen, device=device), memory_bytes=2**40) for w in ("src", "dst")]


def in_process(gen, device: str, sizes: list[int], repeats: int, always_copy: bool) -> list[dict]:
    from turboserve.engine.migration import Migration
    from turboserve.engine.transfer import DeviceTransfer

    rows = []
    for nbytes in sizes:
        src, dst = _engines(gen, device)
        src.import_session(synthetic_blob("m", nbytes, device), 0.0, active=False)
        size = src.info("m").state_bytes
        downs, copies = [], []
        for i in range(repeats + 1):  # the first is a warm-up
            a, b = (src, dst) if i % 2 == 0 else (dst, src)
            mig = Migration("m", a, b, link=LINKS["nvlink"], transfer=DeviceTransfer(device, always_copy=always_copy))
            mig.start(float(i))
            mig.begin_stop()
            t0 = time.perf_counter()
            mig.stop_and_copy(float(i))
            report = mig.commit(float(i))
            down = (time.perf_counter() - t0) * 1000.0
            assert report.ok, report
            if i:
                downs.append(down)
                copies.append(mig.measured_copy_ms)
        rows.append({"state_bytes": size, "downtime_ms": statistics.median(downs),
                     "copy_ms": statistics.median(copies),
                     "gbps": size / (statistics.median(downs) / 1000.0) / 1e9})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, port: int, sizes: list[int], repeats: int, piece_bytes: int, results) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    import torch.distributed as dist

    from turboserve.engine.transfer import ack, recv_blob, send_blob
    from turboserve.models.registry import load_generator

    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300))
    try:
        gen = load_generator("tiny", device="cpu", seed=0)
        core = _engines(gen, "cpu")[0]
        for nbytes in sizes:
            times = []
            if rank == 0:
                core.import_session(synthetic_blob("g", nbytes, "cpu"), 0.0, active=False)
                size = core.info("g").state_bytes
            for i in range(repeats + 1):
                if rank == 0:
                    t0 = time.perf_counter()
                    core.hold("g")
                    send_blob(core.export("g", keep=True), 1, piece_bytes=piece_bytes)
                    times.append((time.perf_counter() - t0) * 1000.0)
                    core.unhold("g", 0.0)  # keep the source copy for the next repeat
                else:
                    blob = recv_blob(0, "cpu", piece_bytes=piece_bytes)
                    core.import_session(blob, 0.0, active=False)
                    ack(0, True)
                    core.remove("g")
            if rank == 0:
                core.remove("g")
                down = statistics.median(times[1:])
                results.put({"state_bytes": size, "downtime_ms": down, "gbps": size / (down / 1000.0) / 1e9})
    finally:
        dist.destroy_process_group()


def over_gloo(sizes: list[int], repeats: int, piece_bytes: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.spawn(_gloo_rank, args=(_free_port(), sizes, repeats, piece_bytes, results), nprocs=2, join=False)
    rows = [results.get(timeout=600) for _ in sizes]
    while not procs.join(timeout=60):
        pass
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="1,16,64,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--piece-mib", type=float, default=64.0)
    ap.add_argument("--no-gloo", action="store_true")
    add_device_and_json(ap, "migration.json")
    args = ap.parse_args()
    from turboserve.models.registry import load_generator

    sizes = [int(float(x) * 2**20) for x in args.sizes_mib.split(",")]
    gen = load_generator("tiny", device=args.device, seed=0)
    where = describe_device(args.device)
    print(banner("migration downtime", where) + ("" if torch.cuda.is_available() else "; no GPU here: "
          "in-process = host memcpy, cross-process = gloo over loopback TCP"))
    local = in_process(gen, args.device, sizes, args.repeats, always_copy=True)
    shared = in_process(gen, args.device, sizes, args.repeats, always_copy=False)
    remote = [] if args.no_gloo else over_gloo(sizes, args.repeats, int(args.piece_mib * 2**20))
    print("downtime = hold -> runnable on the destination (export, move, import)")
    print(f"{'state MiB':>9} {'copy ms':>9} {'GB/s':>6} {'handoff ms':>10} {'gloo ms':>9} {'GB/s':>6}")
    for i, r in enumerate(local):
        g = remote[i] if remote else None
        print(f"{r['state_bytes'] / 2**20:>9.1f} {r['downtime_ms']:>9.2f} {r['gbps']:>6.2f} "
              f"{shared[i]['downtime_ms']:>10.3f} "
              + (f"{g['downtime_ms']:>9.1f} {g['gbps']:>6.2f}" if g else f"{'-':>9} {'-':>6}"))
    write_results(args.json, where, torch.cuda.is_available(),
                  {"piece_bytes": int(args.piece_mib * 2**20), "in_process_copy": local,
                   "in_process_handoff": shared, "gloo": remote})
    return 0


if __name__ == "__main__":
    sys.exit(main())
