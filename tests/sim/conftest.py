"""Shared fixtures of the simulator tests: the built-in latency model and a small bursty trace."""

from __future__ import annotations

import pytest

from turboserve.profile import load_latency_model
from turboserve.sim.cli import map_to_shape
from turboserve.traces.rescale import fit_to_gpus
from turboserve.traces.schema import write_trace
from turboserve.traces.synth import SynthConfig, synth_trace

SHAPE = "demo91"
GPUS = 3


@pytest.fixture(scope="session")
def model():
    return load_latency_model()


@pytest.fixture(scope="session")
def small_records(model):
    """~60 sessions of demo91 whose peak needs 3 GPUs."""
    recs = synth_trace(SynthConfig(hours=0.08, seed=3, shape=SHAPE, rate_per_min=20.0), model)
    return map_to_shape(fit_to_gpus(recs, model, SHAPE, GPUS), SHAPE, model)


@pytest.fixture(scope="session")
def small_trace_path(small_records, tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "small.jsonl"
    write_trace(small_records, path)
    return path
