"""Shared fixtures for model-family tests: generators are built once per module (cheap but
not free on 2 cores), and sessions are copied deeply so one test's runs never touch another's."""

from __future__ import annotations


import pytest
import torch

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


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny models' ops are too small to gain from intra-op threads, and with other test
    processes on the same cores extra threads only spin; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
