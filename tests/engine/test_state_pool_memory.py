"""StatePool: bytes per tier and reservations never go negative nor over capacity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turboserve.engine.state_pool import PoolFullError, StatePool

SIDS = ["a", "b", "c", "d"]
ops = st.lists(st.tuples(st.sampled_from(["allocate", "allocate_host", "free", "to_host", "to_gpu",
                                          "reserve", "cancel", "resize"]),
                         st.sampled_from(SIDS), st.integers(0, 60)), max_size=80)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_accounting_matches_a_recount_and_stays_in_bounds(seq):
    pool = StatePool(100)
    gpu: dict[str, int] = {}
    host: dict[str, int] = {}
    res: dict[str, int] = {}
    for kind, sid, n in seq:
        before = (pool.gpu_bytes, pool.host_bytes, pool.reserved_bytes)
        try:
            if kind == "allocate":
                pool.allocate(sid, n)
                res.pop(sid, None)
                gpu[sid] = n
            elif kind == "allocate_host":
                pool.allocate_host(sid, n)
                host[sid] = n
            elif kind == "free":
                pool.free(sid)
                gpu.pop(sid, None) or host.pop(sid, None)
                res.pop(sid, None)
            elif kind == "to_host":
                pool.to_host(sid)
                host[sid] = gpu.pop(sid)
            elif kind == "to_gpu":
                pool.to_gpu(sid)
                gpu[sid] = host.pop(sid)
            elif kind == "reserve":
                pool.reserve(sid, n)
                res[sid] = n
            elif kind == "cancel":
                pool.cancel_reservation(sid)
                res.pop(sid, None)
            elif kind == "resize":
                pool.resize(sid, n)
                (gpu if sid in gpu else host)[sid] = n
        except (PoolFullError, KeyError, ValueError):
            assert (pool.gpu_bytes, pool.host_bytes, pool.reserved_bytes) == before, "a refusal changed state"
        assert pool.gpu_bytes == sum(gpu.values()) and pool.host_bytes == sum(host.values())
        assert pool.reserved_bytes == sum(res.values())
        assert 0 <= pool.used_bytes <= pool.capacity_bytes
        assert pool.host_bytes >= 0 and pool.free_bytes >= 0


def test_reservation_is_consumed_by_allocate():
    pool = StatePool(100)
    pool.reserve("m", 60)
    with pytest.raises(PoolFullError, match="needs 50 more bytes"):
        pool.allocate("x", 50)
    pool.allocate("m", 60)  # uses its own reservation
    assert (pool.gpu_bytes, pool.reserved_bytes, pool.free_bytes) == (60, 0, 40)


def test_negative_sizes_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        StatePool(-1)
    with pytest.raises(ValueError, match=">= 0"):
        StatePool(10).allocate("a", -5)
