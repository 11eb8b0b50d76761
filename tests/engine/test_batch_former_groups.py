"""BatchFormer: one CompatKey group per batch, oldest waiting group first, oldest sessions first."""

from __future__ import annotations

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
