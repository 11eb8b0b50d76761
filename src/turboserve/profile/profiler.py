"""The profiler: measures a model config on this machine and returns its `ShapeProfile`.

In: a loaded `ChunkGenerator` (any family) and a `ProfilePlan` (batch sizes, context
lengths, repeats). Out: a `ShapeProfile` (profile/format.py, `turboserve-profile/1`) with
- `rounds`: wall time of one coalesced round through `TorchExecutor.execute` over batch x
  context (median of repeats after a warm-up), minus that round's own VAE decode time;
- `fixed_ms`: median per-session VAE decode of one (non-first) chunk, timed inside those
  rounds (it does not coalesce: the family decodes session by session);
- `state_bytes`: one session's state at each measured context;
- `activation_bytes`: peak transient memory of a round (CUDA only; CPU has no counter);
- `transfer`: host copy bandwidth (pinned on CUDA), and the executor's own offload,
  restore and in-process migration (device copy) throughput of real session states.

How a round at context c is measured: B sessions are advanced together to c cached latent
frames; their states are then snapshotted, and each timed repeat restarts from the
snapshot, so every repeat runs at exactly context c. The family decodes pixels inside its
round; the profiler times each decode call there and takes it out of the round. Contexts run from 0 to the steady state of the rolling window
(window minus one chunk cached), which is what `ProfileLatencyModel` clamps to.
"""

from __future__ import annotations

import copy
import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..engine.executor import RoundPlan
from ..engine.torch_executor import TorchExecutor
from ..engine.transfer import DeviceTransfer
from ..models.base import ChunkGenerator, StreamState
from ..policy.latency import ShapeInfo
from .format import RoundPoint, ShapeProfile

COPY_PROBE_BYTES = 64 * 2**20  # tensor size for raw copy-bandwidth probes


@dataclass(frozen=True)
class ProfilePlan:
    batches: tuple[int, ...]
    contexts: tuple[int, ...] | None  # cached latent frames; None = every chunk step of the window
    repeats: int = 3  # timed rounds per point (median)
    warmup: int = 1  # untimed rounds per batch size
    transfer_repeats: int = 3

    @classmethod
    def full(cls) -> "ProfilePlan":
        return cls(batches=(1, 2, 4, 8, 16, 32), contexts=None, repeats=3, warmup=1)

    @classmethod
    def quick(cls) -> "ProfilePlan":
        """Two batches at the two ends of the window: seconds on a CPU, for tests and smoke runs."""
        return cls(batches=(1, 2), contexts=(0, -1), repeats=1, warmup=1, transfer_repeats=1)


@dataclass(frozen=True)
class ModelGeometry:
    """What the profiler needs to know about a model config beyond the generator protocol."""

    name: str
    latent_frames_per_chunk: int
    video_frames_per_chunk: int
    fps: float
    window_frames: int  # latent frames one chunk attends to (its own included)


def geometry(generator: ChunkGenerator, spec) -> ModelGeometry:
    """From the generator's config (`generator.cfg`, a `models.configs.ModelConfig`) or,
    failing that, its model name."""
    from ..models.configs import VAE_TIME_FACTOR, get_config

    cfg = getattr(generator, "cfg", None) or getattr(generator, "config", None) or get_config(spec.model)
    lpc = max(1, spec.frames_per_chunk // VAE_TIME_FACTOR)
    if cfg.family == "helios":
        window = sum(cfg.history_frames) + lpc  # the history the chunk attends to, plus itself
    else:
        window = int(cfg.window_frames)
    window = int(getattr(generator, "window_frames", window) or window)
    return ModelGeometry(spec.model, lpc, spec.frames_per_chunk, float(spec.fps), max(window, lpc))


def plan_contexts(geo: ModelGeometry, plan: ProfilePlan) -> list[int]:
    """Context lengths (cached latent frames) to measure, each a whole number of chunks."""
    steady = geo.window_frames - geo.latent_frames_per_chunk
    steps = list(range(0, steady + 1, geo.latent_frames_per_chunk))
    if plan.contexts is None:
        return steps
    wanted = sorted({steady if c < 0 else min(c, steady) for c in plan.contexts})
    return sorted({min(steps, key=lambda s: abs(s - c)) for c in wanted})


# ------------------------------------------------------------------------------- snapshots
def _snapshot(st: StreamState) -> tuple:
    return st.chunk_index, st.prompt, {k: v.clone() for k, v in st.tensors.items()}, copy.deepcopy(st.meta)


def _restore(st: StreamState, snap: tuple) -> None:
    st.chunk_index, st.prompt, tensors, meta = snap
    st.tensors.clear()
    st.tensors.update({k: v.clone() for k, v in tensors.items()})
    st.meta.clear()
    st.meta.update(copy.deepcopy(meta))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- measurement
class _DecodeTimer:
    """Times every call of the family's VAE decode (`generator.decoder.decode_chunk`, one
    session, and `decode_chunks`, a list of sessions) inside real rounds, by shadowing those
    methods on that one instance while profiling. Subtracting a round's own decode time
    attributes it exactly, where a separately measured decode would be subtracted with its
    own noise. A batched call's time is shared equally by its sessions."""

    METHODS = ("decode_chunk", "decode_chunks")

    def __init__(self, generator: ChunkGenerator, device: torch.device):
        self.decoder = getattr(generator, "decoder", None)
        self.device = device
        self.round_ms = 0.0  # decode time inside the current round
        self.samples_ms: list[float] = []  # per session decoded, while `keep` is set
        self.keep = False
        self._shadowed: list[str] = []

    def _wrap(self, original, sessions_of):
        def timed(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            _sync(self.device)
            ms = (time.perf_counter() - start) * 1000.0
            self.round_ms += ms
            if self.keep:
                n = max(1, sessions_of(args))
                self.samples_ms.extend([ms / n] * n)
            return out

        return timed

    def __enter__(self) -> "_DecodeTimer":
        if self.decoder is None:
            return self
        for name in self.METHODS:
            original = getattr(self.decoder, name, None)
            if original is None:
                continue
            batched = name == "decode_chunks"
            sessions_of = (lambda args: len(args[0]) if args else 1) if batched else (lambda args: 1)
            setattr(self.decoder, name, self._wrap(original, sessions_of))  # shadows the method
            self._shadowed.append(name)
        return self

    def __exit__(self, *exc) -> None:
        for name in self._shadowed:
            delattr(self.decoder, name)
        self._shadowed.clear()


class Profiler:
    def __init__(self, generator: ChunkGenerator, *, plan: ProfilePlan, progress: bool = True,
                 log: Callable[[str], None] | None = None, spec_changes: dict[str, Any] | None = None):
        self.generator = generator
        self.plan = plan
        self.progress = progress
        self.device = torch.device(generator.device)
        self.spec = generator.validate_spec(generator.default_spec().with_(**(spec_changes or {})))
        self.geo = geometry(generator, self.spec)
        self.contexts = plan_contexts(self.geo, plan)
        self.log = log or (lambda msg: None)
        self._sid = 0
        self._decode = _DecodeTimer(generator, self.device)

    def _new_sessions(self, ex: TorchExecutor, n: int) -> list[str]:
        sids = []
        for _ in range(n):
            sid = f"p{self._sid}"
            self._sid += 1
            ex.add_session(sid, self.spec.with_(seed=self._sid), f"profile prompt {self._sid % 7}")
            sids.append(sid)
        return sids

    def _round(self, ex: TorchExecutor, sids: Sequence[str]) -> float:
        """One round through the executor; returns its ms without the VAE decode."""
        self._decode.round_ms = 0.0
        plan = RoundPlan("profile", self.spec.compat_key, tuple(sids), tuple(ex.next_chunk_index(s) for s in sids),
                         tuple(0 for _ in sids))
        res = ex.execute(plan)
        if res.errors:
            raise RuntimeError(f"profiling round failed: {dict(res.errors)}")
        return max(res.duration_ms - self._decode.round_ms, 0.0)

    def measure(self) -> ShapeProfile:
        from tqdm import tqdm

        plan, geo = self.plan, self.geo
        total = len(plan.batches) * len(self.contexts) + 2  # + state bytes, transfers
        bar = tqdm(total=total, desc=f"profile {geo.name}", unit="point", disable=not self.progress)
        try:
            self._decode.__enter__()
            raw: list[tuple[int, int, float]] = []
            peak_act: dict[int, int] = {}
            for batch in plan.batches:
                for ctx, ms, act in self._measure_batch(batch, bar):
                    raw.append((batch, ctx, ms))
                    if act is not None:
                        peak_act[batch] = max(peak_act.get(batch, 0), act)
            bar.set_postfix_str("state bytes")
            state_rows = self.measure_state_bytes()
            bar.update(1)
            bar.set_postfix_str("transfers")
            transfer = self.measure_transfers()
            bar.update(1)
        finally:
            self._decode.__exit__()
            bar.close()
        samples = self._decode.samples_ms
        vae_ms = statistics.median(samples) if samples else 0.0
        rounds = [RoundPoint(b, float(c), ms) for b, c, ms in raw]
        shape = ShapeInfo(
            name=geo.name,
            latent_frames_per_chunk=geo.latent_frames_per_chunk,
            video_frames_per_chunk=geo.video_frames_per_chunk,
            fps=geo.fps,
            window_frames=geo.window_frames,
            passes=self.spec.steps + 1,
            weights_bytes=weights_bytes(self.generator),
            gpu_memory_bytes=device_memory_bytes(self.device),
        )
        return ShapeProfile(
            shape=shape,
            rounds=rounds,
            fixed_ms=vae_ms,
            state_bytes=state_rows,
            activation_bytes=sorted(peak_act.items()),
            transfer=transfer,
            source=(f"turboserve profile --model {geo.name} on {device_name(self.device)}; torch "
                    f"{torch.__version__}, {str(self.generator.dtype).removeprefix('torch.')}; batches "
                    f"{list(plan.batches)}, contexts {self.contexts}, median of {plan.repeats}; "
                    f"rounds exclude the VAE (fixed_ms)"
                    + ("" if self.device.type == "cuda" else "; CPU: no activation counter, host copies unpinned")
                    + f"; load average {os.getloadavg()[0]:.1f} at the end (other processes inflate CPU timings)"),
            device=device_name(self.device),
            measured_at=datetime.date.today().isoformat(),
        )

    def _measure_batch(self, batch: int, bar) -> list[tuple[int, int, int | None]]:
        """Advance `batch` sessions through the window; time rounds at each planned context."""
        ex = TorchExecutor(self.generator, device=self.device)
        sids = self._new_sessions(ex, batch)
        out = []
        lpc = self.geo.latent_frames_per_chunk
        warmed = False
        ctx = 0
        for target in self.contexts:
            while ctx < target:
                self._round(ex, sids)
                ctx += lpc
            states = [ex.stream_state(s) for s in sids]
            snaps = [_snapshot(st) for st in states]
            if not warmed:
                for _ in range(self.plan.warmup):
                    self._round(ex, sids)
                    for st, sn in zip(states, snaps):
                        _restore(st, sn)
                warmed = True
            times = []
            act = None
            for _ in range(max(1, self.plan.repeats)):
                for st, sn in zip(states, snaps):
                    _restore(st, sn)
                base = None
                if self.device.type == "cuda":
                    _sync(self.device)
                    torch.cuda.reset_peak_memory_stats(self.device)
                    base = torch.cuda.memory_allocated(self.device)
                self._decode.keep = target > 0 or len(self.contexts) == 1
                times.append(self._round(ex, sids))
                self._decode.keep = False
                if base is not None:
                    act = max(act or 0, torch.cuda.max_memory_allocated(self.device) - base)
            # The last repeat advanced the sessions one chunk: continue from there.
            ctx += lpc
            self.log(f"batch {batch} context {target}: {statistics.median(times):.1f} ms")
            out.append((target, statistics.median(times), act))
            bar.set_postfix(batch=batch, context=target, ms=f"{statistics.median(times):.0f}")
            bar.update(1)
        for s in sids:
            ex.remove_session(s)
        return out

    def measure_state_bytes(self) -> list[tuple[float, int]]:
        """One session's state bytes at every chunk step up to the full window (and one past:
        the rolling window must hold it flat)."""
        ex = TorchExecutor(self.generator, device=self.device)
        (sid,) = self._new_sessions(ex, 1)
        lpc = self.geo.latent_frames_per_chunk
        rows = [(0.0, ex.state_bytes(sid))]
        ctx = 0
        while ctx < self.geo.window_frames:
            self._round(ex, [sid])
            ctx += lpc
            rows.append((float(min(ctx, self.geo.window_frames)), ex.state_bytes(sid)))
        ex.remove_session(sid)
        return rows

    def measure_transfers(self) -> dict[str, float]:
        """GB/s (1e9 bytes/s): raw copies, and the executor's offload / restore / migration
        of real full-window session states."""
        rates = copy_bandwidth(self.device, repeats=self.plan.transfer_repeats)
        ex = TorchExecutor(self.generator, device=self.device)
        sids = self._new_sessions(ex, 2)
        for _ in range(self.geo.window_frames // self.geo.latent_frames_per_chunk):
            self._round(ex, sids)
        off, res, mig = [], [], []
        transfer = DeviceTransfer(self.device, always_copy=True)  # a real device copy
        for _ in range(max(1, self.plan.transfer_repeats)):
            for sid in sids:
                nbytes = ex.state_bytes(sid)
                off.append(nbytes / _timed(lambda: (ex.offload(sid), ex.synchronize()), self.device))
                res.append(nbytes / _timed(lambda: (ex.restore(sid), ex.synchronize()), self.device))
                blob = ex.export_state(sid)
                mig.append(nbytes / _timed(lambda: transfer(blob), self.device))
        for sid in sids:
            ex.remove_session(sid)
        rates["offload_gbps"] = statistics.median(off) / 1e9
        rates["restore_gbps"] = statistics.median(res) / 1e9
        rates["migration_gbps"] = statistics.median(mig) / 1e9
        return {k: round(v, 3) for k, v in rates.items()}


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds fn takes, device work included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return max(time.perf_counter() - start, 1e-9)


def copy_bandwidth(device: torch.device, *, nbytes: int = COPY_PROBE_BYTES, repeats: int = 3) -> dict[str, float]:
    """Raw copy rates in GB/s: d2h/h2d through pinned host memory, d2h into pageable memory,
    and d2d. On CPU every one is a host memcpy (there is no pinned memory or DMA engine)."""
    n = max(1, nbytes // 4)
    pin = device.type == "cuda"
    src_dev = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    host_pinned = torch.empty(n, dtype=torch.float32, pin_memory=pin)
    host_pageable = torch.empty(n, dtype=torch.float32)
    dst_dev = torch.empty(n, dtype=torch.float32, device=device)
    pairs = {
        "d2h_pinned_gbps": (host_pinned, src_dev),
        "h2d_pinned_gbps": (dst_dev, host_pinned),
        "d2h_pageable_gbps": (host_pageable, src_dev),
        "d2d_gbps": (dst_dev, src_dev),
    }
    out = {}
    for key, (dst, src) in pairs.items():
        dst.copy_(src)  # warm-up (page faults, first-touch)
        times = [_timed(lambda: dst.copy_(src, non_blocking=pin), device) for _ in range(max(1, repeats))]
        out[key] = n * 4 / statistics.median(times) / 1e9
    return out


def weights_bytes(generator: Any) -> int:
    """Bytes of every parameter and buffer of the generator's torch modules, each counted once."""
    seen: set[int] = set()
    total = 0
    for value in vars(generator).values():
        modules = [value] if isinstance(value, torch.nn.Module) else []
        inner = getattr(value, "vae", None)  # a wrapper (e.g. the chunk decoder) around a module
        if isinstance(inner, torch.nn.Module):
            modules.append(inner)
        for module in modules:
            for t in list(module.parameters()) + list(module.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def profile_model(model: str, *, weights: str | None = None, device: str = "cpu", quick: bool = False,
                  seed: int = 0, progress: bool = True, shape_name: str | None = None,
                  batches: Sequence[int] | None = None, contexts: Sequence[int] | None = None,
                  spec_changes: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
                  attention_backend: str | None = None) -> ShapeProfile:
    """Load `model` (a model config name) and measure it. `shape_name` renames the shape
    (default: the model config name); `batches` / `contexts` replace the plan's (a context
    of -1 is the window's steady state); `spec_changes` are SessionSpec fields (width,
    height, frames_per_chunk, steps) that replace the model's defaults."""
    from dataclasses import replace as _replace

    from ..models.registry import load_generator

    plan = ProfilePlan.quick() if quick else ProfilePlan.full()
    if batches:
        if min(batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {list(batches)}")
        plan = _replace(plan, batches=tuple(sorted(set(batches))))
    if contexts:
        plan = _replace(plan, contexts=tuple(contexts))
    generator = load_generator(model, weights=weights, device=device, seed=seed, dtype=dtype,
                               attention_backend=attention_backend)
    profiler = Profiler(generator, plan=plan, progress=progress, spec_changes=spec_changes)
    profile = profiler.measure()
    if shape_name and shape_name != profile.shape.name:
        from dataclasses import replace

        profile.shape = replace(profile.shape, name=shape_name)
    return profile
