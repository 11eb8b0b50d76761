"""Offload/resume throughput of `TorchExecutor` against the raw copy bandwidth of this machine.

For each state size, a session whose state is that many bytes (a KV-cache-like tensor plus
small ones, imported into the executor as a migrated session would be) is offloaded to the
host tier and restored, repeatedly. Throughput = state bytes / wall time of the call plus
the wait for its copy (`synchronize`). The reference is a plain copy of the same bytes
between preallocated buffers: pinned host <-> device on CUDA (the PCIe limit), a host
memcpy on CPU. Target: executor >= 90% of the reference. The first cycle is reported apart
(cold: fresh host buffers); the steady state reuses the executor's recycled buffers.

On CUDA it also measures overlap: a restore enqueued on the side stream while a round of
the `tiny` model runs should add little to that round.

    python bench/offload.py [--sizes-mib 2,16,64,256] [--repeats 7] [--device cpu|cuda]

Prints a table and writes JSON (`--json`, default bench/results/offload.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import (  # first: puts src/ on sys.path
    add_device_and_json, banner, describe_device, run_round, synthetic_tensors, write_results,
)

import torch

from turboserve.engine.executor import SessionBlob
from turboserve.engine.torch_executor import TorchExecutor
from turboserve.models.base import StreamState
from turboserve.models.registry import load_generator

TARGET = 0.90


def synthetic_state(sid: str, spec, nbytes: int, device: torch.device) -> StreamState:
    """A state of ~nbytes: one big KV-like tensor (bf16 on CUDA, f32 on CPU) and small extras."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tensors = synthetic_tensors(nbytes, device, dtype)
    return StreamState(sid, spec, "bench", chunk_index=0, tensors=tensors, meta={})


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class ReferenceCopy:
    """A plain copy of n bytes between preallocated buffers: pinned host <-> device on CUDA
    (the PCIe limit), host memcpy on CPU."""

    def __init__(self, nbytes: int, device: torch.device):
        n = max(1, nbytes // 4)
        self.nbytes = n * 4
        self.device = device
        self.dev = torch.randn(n, device=device)
        self.host = torch.empty(n, pin_memory=device.type == "cuda")
        self.dev2 = torch.empty(n, device=device)
        self.host.copy_(self.dev), self.dev2.copy_(self.host)  # first touch of every page

    def to_host_s(self) -> float:
        return timed(lambda: self.host.copy_(self.dev, non_blocking=self.device.type == "cuda"), self.device)

    def to_device_s(self) -> float:
        return timed(lambda: self.dev2.copy_(self.host, non_blocking=self.device.type == "cuda"), self.device)


def measure_size(ex: TorchExecutor, spec, nbytes: int, repeats: int) -> dict:
    """Executor and reference copies alternate in one loop, so both see the same machine
    (other processes' load shifts absolute numbers on a shared box, not the ratio)."""
    device = ex.device
    sid = f"s{nbytes}"
    state = synthetic_state(sid, spec, nbytes, device)
    ex.import_state(SessionBlob(sid, spec, "bench", 0, state.nbytes(), state))
    del state
    size = ex.state_bytes(sid)
    ref = ReferenceCopy(size, device)
    cold_off = timed(lambda: (ex.offload(sid), ex.synchronize()), device)
    cold_res = timed(lambda: (ex.restore(sid), ex.synchronize()), device)
    off, res, ref_h, ref_d = [], [], [], []
    for _ in range(repeats):
        off.append(timed(lambda: (ex.offload(sid), ex.synchronize()), device))
        ref_h.append(ref.to_host_s())
        res.append(timed(lambda: (ex.restore(sid), ex.synchronize()), device))
        ref_d.append(ref.to_device_s())
    ex.remove_session(sid)
    ex.release_buffers()
    off_gbps = size / statistics.median(off) / 1e9
    res_gbps = size / statistics.median(res) / 1e9
    ref_d2h = ref.nbytes / statistics.median(ref_h) / 1e9
    ref_h2d = ref.nbytes / statistics.median(ref_d) / 1e9
    return {
        "state_bytes": size,
        "offload_gbps": off_gbps,
        "restore_gbps": res_gbps,
        "cold_offload_gbps": size / cold_off / 1e9,
        "cold_restore_gbps": size / cold_res / 1e9,
        "reference_to_host_gbps": ref_d2h,
        "reference_to_device_gbps": ref_h2d,
        "offload_vs_reference": off_gbps / ref_d2h,
        "restore_vs_reference": res_gbps / ref_h2d,
    }


def measure_overlap(gen, ex: TorchExecutor, nbytes: int) -> dict:
    """CUDA only: a round alone vs. the same round with a restore of nbytes enqueued first."""
    spec = gen.default_spec()
    for i in range(4):
        ex.add_session(f"r{i}", spec.with_(seed=i), "overlap")
    sids = tuple(f"r{i}" for i in range(4))

    def round_ms() -> float:
        return run_round(ex, spec, sids).duration_ms

    for _ in range(2):
        round_ms()
    alone = statistics.median([round_ms() for _ in range(5)])
    state = synthetic_state("big", spec, nbytes, ex.device)
    ex.import_state(SessionBlob("big", spec, "bench", 0, state.nbytes(), state))
    del state
    with_copy = []
    for _ in range(5):
        ex.offload("big")
        ex.synchronize()
        ex.restore("big")  # enqueued on the side stream; the round does not wait for it
        with_copy.append(round_ms())
        ex.synchronize()
    return {"round_ms": alone, "round_with_restore_ms": statistics.median(with_copy), "restore_bytes": nbytes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mib", default="2,16,64,256")
    ap.add_argument("--repeats", type=int, default=7)
    add_device_and_json(ap, "offload.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    gen = load_generator("tiny", device=device, seed=0)
    ex = TorchExecutor(gen, device=device)
    spec = gen.default_spec()
    where = describe_device(device)
    print(banner("offload/resume", where))
    if device.type != "cuda":
        print("no GPU: 'device' and 'host' tiers are both CPU memory; the reference is a host memcpy "
              "between preallocated buffers, not PCIe")
    rows = []
    header = f"{'state MiB':>9} {'offload':>8} {'restore':>8} {'ref ->host':>10} {'ref ->dev':>9} {'off/ref':>8} {'res/ref':>8} {'cold off':>8} {'cold res':>8}"
    print(header + "   (GB/s)")
    for mib in [float(x) for x in args.sizes_mib.split(",")]:
        r = measure_size(ex, spec, int(mib * 2**20), args.repeats)
        rows.append(r)
        print(f"{r['state_bytes'] / 2**20:>9.1f} {r['offload_gbps']:>8.2f} {r['restore_gbps']:>8.2f} "
              f"{r['reference_to_host_gbps']:>10.2f} {r['reference_to_device_gbps']:>9.2f} "
              f"{r['offload_vs_reference']:>8.0%} {r['restore_vs_reference']:>8.0%} "
              f"{r['cold_offload_gbps']:>8.2f} {r['cold_restore_gbps']:>8.2f}")
    worst = min(min(r["offload_vs_reference"], r["restore_vs_reference"]) for r in rows)
    print(f"worst steady-state ratio {worst:.0%} (target >= {TARGET:.0%}): {'met' if worst >= TARGET else 'NOT met'}")
    overlap = None
    if device.type == "cuda":
        overlap = measure_overlap(gen, ex, int(max(float(x) for x in args.sizes_mib.split(",")) * 2**20))
        print(f"overlap: round {overlap['round_ms']:.1f} ms alone, {overlap['round_with_restore_ms']:.1f} ms "
              f"with a {overlap['restore_bytes'] / 2**20:.0f} MiB restore in flight")
    write_results(args.json, where, device.type == "cuda",
                  {"rows": rows, "worst_ratio": worst, "target": TARGET, "overlap": overlap})
    return 0


if __name__ == "__main__":
    sys.exit(main())
