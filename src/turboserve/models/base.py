"""The model-family interface: what the engine needs from a streaming video model.

In: a `SessionSpec`, a prompt, and batches of compatible sessions' `StreamState`s.
Out: the next chunk of video frames for each session, with each state advanced in place.

A family keeps *all* of a session's evolving state in `StreamState.tensors` (a flat dict of
tensors: KV caches, VAE causal cache, latent history, RNG state) plus `StreamState.meta`
(JSON-able counters). Because the state is flat, the engine offloads, migrates and
checkpoints sessions without knowing the family: moving the tensors *is* moving the session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from ..types import SessionSpec


@dataclass
class StreamState:
    """One session's state on some device. The family owns the meaning of each entry."""

    session_id: str
    spec: SessionSpec
    prompt: str
    chunk_index: int = 0  # chunks generated so far
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able only

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device | None:
        for t in self.tensors.values():
            return t.device
        return None


@dataclass
class Checkpoint:
    """What a family needs to rebuild a session by recomputation: small (latent history of
    the attention window, RNG state, prompt, chunk index), unlike the full state."""

    session_id: str
    spec: SessionSpec
    prompt: str
    chunk_index: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@runtime_checkable
class ChunkGenerator(Protocol):
    family: str  # e.g. "wan-causal", "helios"
    device: torch.device
    dtype: torch.dtype

    def default_spec(self) -> SessionSpec:
        """The spec a session gets when it asks for nothing (resolution, chunk frames, steps)."""
        ...

    def validate_spec(self, spec: SessionSpec) -> SessionSpec:
        """Fill defaults (0 = model default) and raise ValueError naming the field and the
        allowed values when the model cannot serve this spec."""
        ...

    def start_session(self, session_id: str, spec: SessionSpec, prompt: str) -> StreamState: ...

    def generate(self, states: Sequence[StreamState]) -> list[torch.Tensor]:
        """One chunk for each session, coalesced where the family can. Returns per session
        uint8 frames (T, H, W, 3) on the CPU; advances each state in place."""
        ...

    def set_prompt(self, state: StreamState, prompt: str) -> None:
        """Takes effect from the next chunk."""
        ...

    def checkpoint(self, state: StreamState) -> Checkpoint: ...

    def rebuild(self, ckpt: Checkpoint) -> StreamState:
        """Recompute the full state from a checkpoint (e.g. the KV cache from the latent
        history); the session then continues as if never interrupted."""
        ...
