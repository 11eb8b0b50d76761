"""Fitting a trace's peak within a fixed span: sampling sessions, overlaying copies."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turboserve.cli import main
from turboserve.profile import load_latency_model
from turboserve.traces.rescale import TraceTooSmall, peak_demand
from turboserve.traces.schema import read_trace
from turboserve.traces import span_fit
from turboserve.traces.span_fit import fit_in_span
from turboserve.traces.synth import SynthConfig, synth_trace
from turboserve.types import Period, SessionRecord, SessionSpec

MODEL = load_latency_model()
REPO = Path(__file__).resolve().parents[2]
SHARED = next((p for p in (REPO.parent / "shared" / "traces", Path("/work/shared/traces")) if p.is_dir()), None)


def _trace(seed: int, shape: str = "demo91", hours: float = 0.5, rate: float = 8.0) -> list[SessionRecord]:
    return synth_trace(SynthConfig(seed=seed, hours=hours, rate_per_min=rate, shape=shape), MODEL)


def _check(original, fitted, fit, gpus, span_s, shape="demo91", slo_ms=None):
    peak, _ = peak_demand(fitted, MODEL, shape, slo_ms)
    assert gpus - 1 < peak <= gpus + 1e-9
    assert fit.peak_gpus == pytest.approx(peak) and fit.kept == len(fitted) <= fit.offered
    assert all(0.0 <= r.arrival_s <= span_s + 1e-6 for r in fitted)
    assert len({r.id for r in fitted}) == len(fitted)
    assert [r.arrival_s for r in fitted] == sorted(r.arrival_s for r in fitted)
    # sessions are the original ones (copies carry `~j`): periods and specs untouched
    by_id = {r.id: r for r in original}
    for r in fitted:
        src = by_id[r.id.split("~")[0]]
        assert r.periods == src.periods and r.spec == src.spec


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), gpus=st.integers(1, 12), shape=st.sampled_from(["demo91", "wan1.3b-320p"]))
def test_peak_fits_within_the_span(seed, gpus, shape):
    rs = _trace(seed, shape)
    span_s = 1800.0
    fitted, fit = fit_in_span(rs, MODEL, shape, gpus, span_s, seed=seed)
    _check(rs, fitted, fit, gpus, span_s, shape)
    assert fit.time_factor == pytest.approx(span_s / max(r.arrival_s for r in rs))


def test_a_dense_trace_is_sampled_and_keeps_its_time_axis():
    rs = _trace(3, rate=40.0)
    span_s = max(r.arrival_s for r in rs)
    fitted, fit = fit_in_span(rs, MODEL, "demo91", 4, span_s, seed=1)
    _check(rs, fitted, fit, 4, span_s)
    assert fit.copies == 1 and fit.time_factor == pytest.approx(1.0) and fit.kept < len(rs)
    # a kept session arrives when it did in the trace
    by_id = {r.id: r for r in rs}
    assert all(r.arrival_s == pytest.approx(by_id[r.id].arrival_s, abs=1e-5) for r in fitted)
    # arrivals stay spread over the span: each third of it keeps some sessions
    thirds = Counter(min(2, int(3 * r.arrival_s / span_s)) for r in fitted)
    assert set(thirds) == {0, 1, 2}


def test_a_small_trace_gets_jittered_copies():
    rs = _trace(5, rate=2.0)
    span_s = 1800.0
    alone, _ = peak_demand(rs, MODEL, "demo91", factor=span_s / max(r.arrival_s for r in rs))
    gpus = int(alone) + 4
    fitted, fit = fit_in_span(rs, MODEL, "demo91", gpus, span_s, seed=2, jitter_s=30.0)
    _check(rs, fitted, fit, gpus, span_s)
    assert fit.copies > 1 and any("~" in r.id for r in fitted)
    factor = span_s / max(r.arrival_s for r in rs)
    by_id = {r.id: r for r in rs}
    for r in fitted:
        src = by_id[r.id.split("~")[0]]
        assert abs(r.arrival_s - min(span_s, src.arrival_s * factor)) <= 30.0 + 1e-6


@pytest.mark.parametrize("extra_gpus", [1, 4, 13])
def test_the_copy_count_is_the_fewest_that_exceeds_the_target(extra_gpus):
    """The doubling-and-bisecting search agrees with adding copies one by one."""
    rs = _trace(6, rate=2.0)
    span_s = 1800.0
    fitted, fit = fit_in_span(rs, MODEL, "demo91", 1, span_s, seed=1)  # no copies at 1 GPU
    base = [replace(r, arrival_s=round(r.arrival_s * fit.time_factor, 6)) for r in rs]
    alone, _ = peak_demand(base, MODEL, "demo91")
    gpus = int(alone) + extra_gpus
    _, fit = fit_in_span(rs, MODEL, "demo91", gpus, span_s, seed=7, jitter_s=20.0)
    rng = np.random.default_rng(7)
    pool, k = list(base), 1
    while peak_demand(pool, MODEL, "demo91")[0] <= gpus + 1e-9:
        pool += span_fit._copy(base, k, span_s, 20.0, rng)
        k += 1
    assert fit.copies == k > 1


def test_deterministic_per_seed():
    rs = _trace(9, rate=30.0)
    a, _ = fit_in_span(rs, MODEL, "demo91", 3, 1800.0, seed=4)
    b, _ = fit_in_span(rs, MODEL, "demo91", 3, 1800.0, seed=4)
    c, _ = fit_in_span(rs, MODEL, "demo91", 3, 1800.0, seed=5)
    assert a == b and a != c


def test_bad_input():
    spec = SessionSpec("demo91", frames_per_chunk=4)
    at_zero = [SessionRecord(f"s{i}", 0.0, spec, (Period(10.0, 0.0),)) for i in range(3)]
    with pytest.raises(ValueError, match="time axis"):
        fit_in_span(at_zero, MODEL, "demo91", 2, 600.0)
    rs = _trace(1)
    for kwargs, msg in (({"gpus": 0}, "fit-gpus"), ({"span_s": 0.0}, "span"), ({"jitter_s": -1.0}, "jitter")):
        args = {"gpus": 2, "span_s": 600.0} | kwargs
        with pytest.raises(ValueError, match=msg):
            fit_in_span(rs, MODEL, "demo91", args.pop("gpus"), args.pop("span_s"), **args)
    one = [SessionRecord("s", 5.0, spec, (Period(1.0, 0.0),))]
    with pytest.raises(TraceTooSmall, match="copies"):
        fit_in_span(one, MODEL, "demo91", 64, 600.0)


@pytest.mark.skipif(SHARED is None, reason="../shared/traces not present")
def test_cli_fits_mooncake_within_the_hour(tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    # wan14b-480p at 8 GPUs: moving arrivals cannot fit it (sessions at the same millisecond)
    assert main(["trace", "convert", "--format", "mooncake", "--model", "wan14b-480p", "--fit-gpus", "8",
                 "--span-hours", "1", "--set", "slo.slo_ms=2600", "--out", str(out),
                 str(SHARED / "mooncake-conversation.jsonl")]) == 0
    assert "sessions kept" in capsys.readouterr().out
    records = read_trace(out)
    peak, _ = peak_demand(records, MODEL, "wan14b-480p", slo_ms=2600.0)
    assert 7 < peak <= 8 + 1e-9
    assert 50 * 60 < max(r.arrival_s for r in records) <= 3600.0
    assert main(["trace", "convert", "--format", "mooncake", "--span-hours", "1", "--out", str(out),
                 str(SHARED / "mooncake-conversation.jsonl")]) == 2
    assert "--fit-gpus" in capsys.readouterr().err


def test_cli_synth_fits_within_the_span(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    argv = ["trace", "synth", "--hours", "0.5", "--rate", "40", "--seed", "3", "--fit-gpus", "4",
            "--span-hours", "0.5", "--out", str(out)]
    assert main(argv) == 0
    assert "sessions kept" in capsys.readouterr().out
    records = read_trace(out)
    peak, _ = peak_demand(records, MODEL, "demo91")
    assert 3 < peak <= 4 + 1e-9
    assert max(r.arrival_s for r in records) == pytest.approx(1800.0, abs=1e-3)
    out2 = tmp_path / "s2.jsonl"
    assert main([*argv[:-1], str(out2)]) == 0
    assert out.read_bytes() == out2.read_bytes()
    assert main(["trace", "synth", "--span-hours", "1", "--out", str(out)]) == 2
    assert "--fit-gpus" in capsys.readouterr().err
    assert main(["trace", "synth", "--fit-gpus", "4", "--copy-jitter-s", "30", "--out", str(out)]) == 2
    assert "give --span-hours too" in capsys.readouterr().err
