"""Helpers the engine benchmarks share: the repository's `src` on the import path, a line
naming the machine a run measured, the JSON results file, and synthetic session states.

In: an argument parser; a torch device; a results dict; a state size in bytes.
Out: the shared `--device`/`--json` options; `where` (GPU name, or CPU with its core count) and a printed header line; the JSON file
with the machine's facts (device, torch version, threads, load average, GPU or not) merged
in; a tensors dict of about the asked size (one KV-like tensor plus small extras).

Importing this module puts `REPO/src` first on `sys.path`, so `turboserve` imports from the
checkout the script runs in (scripts here run as `python bench/<name>.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

RESULTS = REPO / "bench" / "results"
RNG_STATE_BYTES = 5056  # size of a CPU generator state, the `rng` tensor of a session
LATENTS_BYTES = 4096  # 1024 float32


def add_device_and_json(ap: argparse.ArgumentParser, json_name: str) -> None:
    """`--device` (default cuda when there is one) and `--json` (default bench/results/<json_name>)."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=str(RESULTS / json_name))


def describe_device(device: torch.device | str) -> str:
    """The GPU's name on CUDA, else `CPU (N cores)`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def banner(what: str, where: str) -> str:
    """`<what> on <where>; torch V, N threads, load average L`, the first line of a run."""
    return (f"{what} on {where}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.1f}")


def write_results(path: str | Path, where: str, gpu: bool, results: dict[str, Any]) -> None:
    """Write `results` as JSON after the machine's facts, and say where."""
    out = {"device": where, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "load_average": os.getloadavg()[0], "gpu": gpu, **results}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


def synthetic_tensors(nbytes: int, device: torch.device | str,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A session-like state of ~nbytes: one big KV-like tensor of `dtype` (random values, so
    nothing compresses or aliases) plus float32 latents and a uint8 RNG state."""
    elem_bytes = torch.tensor([], dtype=dtype).element_size()
    elems = max(1, (nbytes - LATENTS_BYTES - RNG_STATE_BYTES) // elem_bytes)
    return {
        "kv": torch.randn(elems, device=device).to(dtype),
        "latents": torch.randn(LATENTS_BYTES // 4, device=device),
        "rng": torch.randint(0, 255, (RNG_STATE_BYTES,), dtype=torch.uint8, device=device),
    }


def run_round(ex, spec, sids: tuple[str, ...]):
    """One round of the sessions `sids` (all of `spec`'s compatibility group) through an
    executor's `execute`, each at its next chunk; returns the executor's result."""
    from turboserve.engine.executor import RoundPlan

    plan = RoundPlan("bench", spec.compat_key, sids, tuple(ex.next_chunk_index(s) for s in sids), (0,) * len(sids))
    return ex.execute(plan)
