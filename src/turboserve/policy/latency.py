"""The latency and memory model interface that policies plan with.

In: a shape name (a model at a resolution with a measured profile), a batch of compatible
sessions, their context length. Out: predicted milliseconds and bytes. The implementation
(`turboserve.profile.model.ProfileLatencyModel`) interpolates measured tables; policies
only see this protocol, so they stay pure and testable with a hand-written fake.

An implementation may also set `round_ms_monotone = True` when `round_ms` never falls as
batch or context grow and `context_after` never passes the shape's window: rebalancing
then rules out moves from a worker's groups alone (`policy.rebalance._source_could_pay`),
with the same decisions; without it every candidate session is listed and tried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ShapeInfo:
    name: str
    latent_frames_per_chunk: int  # latent frames generated per chunk
    video_frames_per_chunk: int  # decoded frames delivered per chunk
    fps: float  # playback rate the profile's chunk duration assumes
    window_frames: int  # attention window in latent frames: the context never exceeds this
    passes: int  # forward passes per chunk the table was measured with (steps + 1 clean pass)
    weights_bytes: int  # model weights resident on each GPU
    gpu_memory_bytes: int  # memory of the profiled GPU

    @property
    def chunk_ms(self) -> float:
        """Playback time of one chunk: the default SLO."""
        return 1000.0 * self.video_frames_per_chunk / self.fps


class LatencyModel(Protocol):
    def shape(self, name: str) -> ShapeInfo: ...

    def round_ms(self, shape: str, batch: int, context_frames: float, steps: int) -> float:
        """One coalesced round of `batch` compatible sessions whose mean context (latent
        frames already cached) is `context_frames`, denoised in `steps` steps plus one clean
        pass. Excludes per-session fixed costs."""
        ...

    def fixed_ms(self, shape: str) -> float:
        """Per-session, per-chunk work that does not coalesce (VAE decode, encoding)."""
        ...

    def state_bytes(self, shape: str, context_frames: float) -> int:
        """A session's state on the GPU (KV cache, VAE cache, latents) at this context."""
        ...

    def activation_bytes(self, shape: str, batch: int) -> int:
        """Transient memory of one round at this batch size."""
        ...

    def context_after(self, shape: str, chunks_done: int) -> int:
        """Context (latent frames) a session has after `chunks_done` chunks: grows, then
        stays at the attention window."""
        ...

    def capacity(self, shape: str, slo_ms: float, steps: int) -> int:
        """Most sessions of this shape one GPU serves within `slo_ms` per chunk at a full
        window (steady state). 0 when a single session already misses the SLO."""
        ...


def transfer_ms(nbytes: int, alpha_ms: float, bandwidth_gbps: float) -> float:
    """Alpha-beta transfer time of `nbytes` over a link."""
    return alpha_ms + nbytes / (bandwidth_gbps * 1e9) * 1000.0
