"""Session-trace JSONL: round trip, and errors that name the line and the field."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turboserve.traces.schema import TraceError, read_trace, write_trace
from turboserve.types import Period, SessionRecord, SessionSpec

finite = st.floats(min_value=0, max_value=1e5, allow_nan=False).map(lambda x: round(x, 3))
records = st.builds(
    SessionRecord,
    id=st.text("abcdef0123", min_size=1, max_size=8),
    arrival_s=finite,
    spec=st.builds(SessionSpec, model=st.sampled_from(["demo91", "tiny"]), fps=st.sampled_from([16.0, 24.0]),
                   frames_per_chunk=st.integers(1, 12), steps=st.integers(1, 8), seed=st.integers(0, 2**31 - 1)),
    periods=st.lists(st.builds(Period, finite, finite), min_size=1, max_size=5).map(tuple),
    prompt=st.text(max_size=20),
    meta=st.dictionaries(st.sampled_from(["source", "turns"]), st.integers(0, 9), max_size=2),
)


@settings(max_examples=60, deadline=None)
@given(rs=st.lists(records, max_size=6, unique_by=lambda r: r.id))
def test_round_trip(tmp_path_factory, rs):
    path = tmp_path_factory.mktemp("t") / "t.jsonl"
    write_trace(rs, path)
    back = read_trace(path)
    assert sorted(back, key=lambda r: r.id) == sorted(rs, key=lambda r: r.id)
    assert [r.meta for r in sorted(back, key=lambda r: r.id)] == [r.meta for r in sorted(rs, key=lambda r: r.id)]
    assert [r.arrival_s for r in back] == sorted(r.arrival_s for r in rs)  # written by arrival


def _write_lines(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")


GOOD = {"id": "a", "arrival_s": 1.0, "spec": {"model": "demo91"}, "periods": [{"active_s": 3, "idle_s": 1}]}


@pytest.mark.parametrize("bad, match", [
    ({**GOOD, "arrival_s": -1}, r":2: field 'arrival_s'"),
    ({k: v for k, v in GOOD.items() if k != "periods"}, r":2: field 'periods'"),
    ({**GOOD, "periods": [{"idle_s": 1}]}, r":2: periods\[0\]: missing field 'active_s'"),
    ({**GOOD, "spec": {"modle": "x"}}, r":2: spec has unknown fields \['modle'\]"),
    ({**GOOD, "spec": {"fps": 0}}, r":2: spec needs fps > 0"),
    ("{not json", r":2: not valid JSON"),
])
def test_errors_name_line_and_field(tmp_path, bad, match):
    path = tmp_path / "t.jsonl"
    _write_lines(path, [GOOD, bad])
    with pytest.raises(TraceError, match=match):
        read_trace(path)


def test_duplicate_ids_and_missing_file(tmp_path):
    path = tmp_path / "t.jsonl"
    _write_lines(path, [GOOD, GOOD])
    with pytest.raises(TraceError, match="duplicate session id 'a'"):
        read_trace(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_trace(tmp_path / "nope.jsonl")
