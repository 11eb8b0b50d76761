"""BatchFormer: one CompatKey group per batch, oldest waiting group first, oldest sessions first."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turboserve.engine.batch_former import BatchFormer
from turboserve.types import CompatKey

K1 = CompatKey("m", 0, 0, 4, 4)
K2 = CompatKey("m", 0, 0, 4, 2)


def test_picks_group_with_oldest_due_and_caps_batch():
    bf = BatchFormer(max_batch=2)
    bf.mark_due("a", K1, 1.0)
    bf.mark_due("b", K2, 0.5)
    bf.mark_due("c", K1, 2.0)
    bf.mark_due("d", K1, 3.0)
    assert bf.take_batch() == (K2, ["b"], [0.5])
    assert bf.take_batch() == (K1, ["a", "c"], [1.0, 2.0])
    assert bf.take_batch() == (K1, ["d"], [3.0])
    assert bf.take_batch() is None and len(bf) == 0


def test_out_of_order_insert_keeps_oldest_first():
    bf = BatchFormer(max_batch=8)
    bf.mark_due("late", K1, 5.0)
    bf.mark_due("early", K1, 1.0)  # e.g. an aborted migration's session, due for a while
    assert bf.take_batch() == (K1, ["early", "late"], [1.0, 5.0])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([K1, K2]), st.floats(0, 100)), min_size=1, max_size=40),
       st.integers(1, 6))
def test_every_marked_session_comes_out_once_in_its_group(items, max_batch):
    bf = BatchFormer(max_batch)
    for i, (key, due) in enumerate(items):
        bf.mark_due(f"s{i}", key, due)
    seen = []
    while (batch := bf.take_batch()) is not None:
        key, sids, dues = batch
        assert 1 <= len(sids) <= max_batch and dues == sorted(dues)
        assert all(items[int(s[1:])][0] == key for s in sids)
        seen += sids
    assert sorted(seen) == sorted(f"s{i}" for i in range(len(items)))


def _drain(bf: BatchFormer) -> list:
    out = []
    while (batch := bf.take_batch()) is not None:
        out.append(batch)
    return out


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([K1, K2]), st.floats(0, 100), st.integers(1, 4)),
                min_size=1, max_size=12),
       st.integers(1, 5))
def test_mark_due_many_is_mark_due_in_order(groups, max_batch):
    """A round's sessions marked due together (in or out of time order with what is
    already due) come out exactly as when marked one by one."""
    one, many = BatchFormer(max_batch), BatchFormer(max_batch)
    n = 0
    for key, due, count in groups:
        sids = [f"s{n + i}" for i in range(count)]
        n += count
        for sid in sids:
            one.mark_due(sid, key, due)
        many.mark_due_many(key, sids, due)
        assert len(one) == len(many) and one.oldest_due_s() == many.oldest_due_s()
    assert _drain(one) == _drain(many)


def test_mark_due_many_refuses_a_session_already_due():
    bf = BatchFormer()
    bf.mark_due("a", K1, 1.0)
    with pytest.raises(ValueError, match="already due"):
        bf.mark_due_many(K1, ["b", "a"], 2.0)
