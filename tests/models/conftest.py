"""Shared fixtures for model-family tests: generators are built once per module (cheap but
not free on 2 cores), and sessions are copied deeply so one test's runs never touch another's."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from turboserve.models.base import StreamState
from turboserve.models.registry import load_generator


@pytest.fixture(scope="module")
def tiny():
    return load_generator("tiny", device="cpu", seed=0)


@pytest.fixture(scope="module")
def tiny_twin():
    """A second, independent instance with the same weights (migration target)."""
    return load_generator("tiny", device="cpu", seed=0)


@pytest.fixture(scope="module")
def helios():
    return load_generator("helios-tiny", device="cpu", seed=0)


@pytest.fixture(scope="module")
def helios_twin():
    return load_generator("helios-tiny", device="cpu", seed=0)


def clone_state(state: StreamState) -> StreamState:
    return copy.deepcopy(state)


def ship(state: StreamState) -> StreamState:
    """Export a state as bytes and import it back: what crossing a process boundary does."""
    buf = io.BytesIO()
    torch.save({"tensors": state.tensors, "meta": state.meta}, buf)
    buf.seek(0)
    payload = torch.load(buf, weights_only=True)
    return StreamState(session_id=state.session_id, spec=state.spec, prompt=state.prompt,
                       chunk_index=state.chunk_index, tensors=payload["tensors"], meta=payload["meta"])


def run(gen, state: StreamState, chunks: int) -> list[torch.Tensor]:
    return [gen.generate([state])[0] for _ in range(chunks)]


def small(gen):
    """A 32x32 spec of the generator's default model: a quarter of the default's cost, the
    same code paths (tests of behaviour that does not depend on resolution use it)."""
    return gen.default_spec().with_(width=32, height=32)
