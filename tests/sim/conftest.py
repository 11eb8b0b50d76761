"""Shared fixtures of the simulator tests: the built-in latency model and small bursty
traces (one spec, and a mix of two step counts)."""

from __future__ import annotations

from dataclasses import replace

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


@pytest.fixture(scope="session")
def mixed_records(model):
    """~60 sessions of demo91, about half at 2 steps and half at 4 (two coalescing groups,
    one round each on a GPU that holds both), whose peak needs 3 GPUs at perfect packing."""
    cfg = SynthConfig(hours=0.08, seed=4, shape=SHAPE, rate_per_min=20.0)
    cfg = replace(cfg, law=replace(cfg.law, steps_mix=((2, 0.5), (4, 0.5))))
    recs = synth_trace(cfg, model)
    return map_to_shape(fit_to_gpus(recs, model, SHAPE, GPUS), SHAPE, model)
