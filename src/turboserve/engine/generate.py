"""`turboserve generate`: a few prompts' sessions coalesced on one engine, no server.

In: parsed CLI args (`--model`, `--weights`, `--prompt` (repeatable), `--chunks`, `--out`,
`--device`, `--seed`). Out: one H.264 MP4 per prompt in `--out` (`00-<prompt>.mp4`, ...),
written chunk by chunk as rounds deliver; a progress bar; a one-line summary with the
chunks, seconds and per-chunk latency. Exit code 0, or 1 if a session failed.

The sessions run through the same `EngineCore` + `TorchExecutor` as the server: every
round coalesces all due sessions into one forward.
"""

from __future__ import annotations

import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..types import SessionSpec

MAX_PROMPT_CHARS_IN_NAME = 40


@dataclass(frozen=True)
class GenerateResult:
    paths: tuple[Path, ...]  # one MP4 per prompt, in prompt order (failed ones excluded)
    chunks: int  # chunks delivered over all sessions
    frames: int  # video frames written over all sessions
    seconds: float  # wall time of generation (model loading excluded)
    chunk_latency_ms: tuple[float, ...]  # per delivered chunk: delivery - due time
    failed: dict[str, str]  # session id -> error


def resolve_device(name: str | None) -> str:
    """`auto`/None -> cuda when present, else cpu; anything else is checked and passed on."""
    import torch

    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    return name


def device_memory_bytes(device: str) -> int:
    """Memory the engine may plan with on this device: free GPU memory, or physical RAM."""
    import os

    import torch

    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def output_name(index: int, prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:MAX_PROMPT_CHARS_IN_NAME].strip("-")
    return f"{index:02d}-{slug or 'session'}.mp4"


def generate_videos(generator, prompts: Sequence[str], chunks: int, out_dir: str | Path, *,
                    seed: int = 0, max_batch: int = 32, progress: bool = True) -> GenerateResult:
    """Run one session per prompt, coalesced, for `chunks` chunks each; write one MP4 each."""
    from tqdm import tqdm

    from ..video import Mp4Writer
    from .core import EngineCore
    from .torch_executor import TorchExecutor

    if not prompts:
        raise ValueError("give at least one --prompt")
    if chunks < 1:
        raise ValueError(f"--chunks must be >= 1, got {chunks}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = str(generator.device)
    executor = TorchExecutor(generator, device=device)
    core = EngineCore("generate", executor, memory_bytes=device_memory_bytes(device), max_batch=max_batch)
    base = generator.default_spec()
    clock = time.monotonic
    writers: dict[str, Mp4Writer] = {}
    order: list[str] = []
    for i, prompt in enumerate(prompts):
        sid = f"s{i}"
        spec: SessionSpec = generator.validate_spec(base.with_(seed=seed + i))
        writers[sid] = Mp4Writer(out_dir / output_name(i, prompt), fps=spec.fps)
        order.append(sid)
        core.add_session(sid, spec, prompt, clock(), active=True, chunks_wanted=chunks)

    latencies: list[float] = []
    failed: dict[str, str] = {}
    start = clock()
    bar = tqdm(total=chunks * len(prompts), unit="chunk", desc="generate", disable=not progress,
               file=sys.stderr)
    try:
        while core.has_due_work():
            outcome = core.step(clock)
            if outcome is None:
                break
            for d in outcome.deliveries:
                if d.frames is not None:
                    writers[d.session_id].write(d.frames)
                latencies.append(d.latency_ms)
            failed.update(outcome.failed)
            bar.update(len(outcome.session_ids))
            bar.set_postfix(batch=len(outcome.session_ids), round_ms=f"{outcome.duration_ms:.0f}")
    finally:
        bar.close()
    seconds = clock() - start

    paths: list[Path] = []
    frames = 0
    for sid in order:
        writer = writers[sid]
        if sid in failed or writer.frames_written == 0:
            try:
                writer.close()
            except ValueError:
                pass  # nothing was written for a failed session: no file
            failed.setdefault(sid, "no frames were generated")
            continue
        frames += writer.close()
        paths.append(writer.path)
    return GenerateResult(tuple(paths), len(latencies), frames, seconds, tuple(latencies), failed)


def run(args) -> int:
    """`turboserve generate` entry point (see cli.py for the options)."""
    from ..config import load_config
    from ..models.registry import generator_options, load_generator

    cfg = load_config(getattr(args, "config", None), getattr(args, "overrides", None))
    if args.chunks < 1:  # checked before the (slow) model load
        raise ValueError(f"--chunks must be >= 1, got {args.chunks}")
    if any(not p.strip() for p in args.prompt):
        raise ValueError("--prompt must not be empty")
    device = resolve_device(args.device)
    generator = load_generator(args.model, weights=args.weights, device=device, seed=args.seed,
                               **generator_options(cfg.engine))
    result = generate_videos(generator, args.prompt, args.chunks, args.out, seed=args.seed,
                             max_batch=cfg.engine.max_batch)
    lat = sorted(result.chunk_latency_ms)
    p50 = statistics.median(lat) if lat else 0.0
    worst = lat[-1] if lat else 0.0
    print(f"generated {result.chunks} chunks ({result.frames} frames, {len(result.paths)} videos) "
          f"in {result.seconds:.2f} s on {device} ({str(generator.dtype).removeprefix('torch.')}); "
          f"chunk latency p50 {p50:.0f} ms, max {worst:.0f} ms; "
          f"wrote {Path(args.out)}")
    for sid, why in result.failed.items():
        print(f"session {sid} failed: {why}", file=sys.stderr)
    return 1 if result.failed else 0
