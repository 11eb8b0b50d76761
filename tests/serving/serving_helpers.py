"""Helpers for the serving tests: a fake `ChunkGenerator` that keeps the real protocol.

It renders flat frames whose grey level encodes the chunk index, so a test can check after
H.264 encoding and decoding that chunks arrive in order, none missing, none twice. A round
sleeps `delay_s` (per session, like a non-coalescing model) so timing behaves like work
without using the CPU, keeping the serving tests fast on 2 cores. A prompt containing
`NOISE` renders random frames (incompressible: lots of bytes), `FAIL` makes the session's
next chunk raise.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from turboserve.models.base import Checkpoint, StreamState
from turboserve.types import SessionSpec


def level_of(chunk_index: int) -> int:
    """Grey level of a chunk's frames: 8 values 24 apart, robust to lossy coding."""
    return 40 + (chunk_index % 8) * 24


class FakeGenerator:
    family = "fake"

    def __init__(self, device: str = "cpu", *, model: str = "tiny", width: int = 32, height: int = 32,
                 fps: float = 16.0, frames_per_chunk: int = 4, delay_s: float = 0.01,
                 fail_prompt: str = "FAIL"):
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.model = model
        self._default = SessionSpec(model=model, width=width, height=height, fps=fps,
                                    frames_per_chunk=frames_per_chunk, steps=4)
        self.delay_s = delay_s
        self.fail_prompt = fail_prompt  # a session with this prompt fails on its next chunk
        self._rng = np.random.default_rng(0)

    def default_spec(self) -> SessionSpec:
        return self._default

    def validate_spec(self, spec: SessionSpec) -> SessionSpec:
        d = self._default
        spec = spec.with_(width=spec.width or d.width, height=spec.height or d.height)
        if spec.model != d.model:
            raise ValueError(f"model: this server serves {d.model!r}, not {spec.model!r}")
        if (spec.width, spec.height) not in ((d.width, d.height), (4 * d.width, 4 * d.height)):
            raise ValueError(f"width: this model renders {d.width}x{d.height} or "
                             f"{4 * d.width}x{4 * d.height} only")
        if spec.frames_per_chunk != d.frames_per_chunk:
            raise ValueError(f"frames_per_chunk: must be {d.frames_per_chunk}")
        return spec

    def start_session(self, session_id: str, spec: SessionSpec, prompt: str) -> StreamState:
        return StreamState(session_id, spec, prompt,
                           tensors={"history": torch.zeros(64, device=self.device)})

    def generate(self, states: Sequence[StreamState]) -> list[torch.Tensor]:
        time.sleep(self.delay_s * len(states))
        out = []
        for st in states:
            if st.prompt == self.fail_prompt:
                raise RuntimeError(f"session {st.session_id} asked to fail")
            s = st.spec
            frames = np.full((s.frames_per_chunk, s.height, s.width, 3), level_of(st.chunk_index),
                             dtype=np.uint8)
            if "NOISE" in st.prompt:  # incompressible frames: megabytes of video quickly
                frames = self._rng.integers(0, 256, frames.shape, dtype=np.uint8)
            st.tensors["history"] += 1
            st.chunk_index += 1
            out.append(torch.from_numpy(frames))
        return out

    def set_prompt(self, state: StreamState, prompt: str) -> None:
        state.prompt = prompt

    def checkpoint(self, state: StreamState) -> Checkpoint:
        return Checkpoint(state.session_id, state.spec, state.prompt, state.chunk_index,
                          tensors={"history": state.tensors["history"].clone()})

    def rebuild(self, ckpt: Checkpoint) -> StreamState:
        return StreamState(ckpt.session_id, ckpt.spec, ckpt.prompt, ckpt.chunk_index,
                           tensors={"history": ckpt.tensors["history"].clone()})


FALLBACK_PROFILE = Path(__file__).with_name("tiny_profile_fallback.json")


def tiny_latency_model():
    """The built-in profiles, whose `tiny` shape comes from the shipped `tiny-cpu.json`.
    Where a checkout lacks that file, a profile measured with `turboserve profile --model
    tiny` (OMP_NUM_THREADS=1, 2-core CPU) stands in, so these tests still run."""
    from turboserve.profile import load_latency_model

    model = load_latency_model()
    try:
        model.shape("tiny")
    except (KeyError, ValueError, LookupError):
        model = load_latency_model([FALLBACK_PROFILE])
    return model
