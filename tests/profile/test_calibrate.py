"""Calibration on rounds timed while serving, and round-time jitter: the profile scales to
the median slow-down, the jitter keeps the spread, files keep both, and the simulator
draws each round's time from it (seeded, so a run repeats) where it would otherwise
predict every round alike."""

from __future__ import annotations

import random
import statistics
from dataclasses import replace

import pytest

from turboserve.config import load_config
from turboserve.profile import ProfileLatencyModel, load_latency_model, load_profiles, save_profile
from turboserve.profile.calibrate import (JITTER_QUANTILES, MIN_ROUNDS, busy_at_start, calibrate, quantiles,
                                          round_ratios)
from turboserve.profile.format import ProfileError, RoundPoint
from turboserve.sim.driver import simulate
from turboserve.traces.synth import SynthConfig, synth_trace

# demo91's shape with a monotone table (a measured table's envelope would blur exact checks)
BASE = replace(load_latency_model().profile("demo91"),
               rounds=[RoundPoint(b, c, 50.0 + 10.0 * b + 2.0 * c) for b in (1, 2, 4, 8, 16, 32) for c in (0, 6, 12)])


def timed_rounds(ratios, seed=0, batches=(1,)):
    """Rounds of the base profile whose measured time is its prediction times `ratios`."""
    model = ProfileLatencyModel([BASE])
    rng = random.Random(seed)
    out = []
    for r in ratios:
        batch, ctx = rng.choice(batches), rng.choice([0, 4, 12])
        out.append((batch, ctx, 4, r * (model.round_ms("demo91", batch, ctx, 4) + batch * BASE.fixed_ms)))
    return out


def test_calibration_scales_to_the_median_and_keeps_the_spread(tmp_path):
    ratios = [1.2] * 60 + [1.3] * 20 + [2.4] * 20  # median 1.2: a slow-down and a slow tail
    cal = calibrate(BASE, timed_rounds(ratios), unit="ratio")
    assert [r.round_ms for r in cal.rounds] == pytest.approx([1.2 * r.round_ms for r in BASE.rounds])
    assert cal.fixed_ms == pytest.approx(1.2 * BASE.fixed_ms)
    assert statistics.median(cal.jitter) == pytest.approx(1.0)
    assert cal.jitter[-1] == pytest.approx(2.0) and cal.jitter == sorted(cal.jitter)
    assert "x1.200" in cal.source
    # the calibrated profile predicts the measured rounds' median exactly
    assert statistics.median(r for _, r in round_ratios(cal, timed_rounds(ratios))) == pytest.approx(1.0)
    path = tmp_path / "cal.json"
    save_profile(cal, path)
    back = load_profiles(path)[0]
    assert back.jitter == pytest.approx(cal.jitter)
    assert ProfileLatencyModel([back]).jitter("demo91") == pytest.approx(tuple(cal.jitter))


def test_each_batch_size_timed_often_enough_gets_its_own_scale():
    """Under serving the profile's batch curve need not hold: batch 1 ran 1.1x slower than
    profiled, batch 2 1.5x; each batch's prediction takes its own scale, and a batch never
    timed takes the nearest timed one's."""
    model = ProfileLatencyModel([BASE])
    rounds = []
    for i in range(40):
        for batch, ratio in ((1, 1.1), (2, 1.5)):
            ctx = (0, 4, 12)[i % 3]
            rounds.append((batch, ctx, 4, ratio * (model.round_ms("demo91", batch, ctx, 4) + batch * BASE.fixed_ms)))
    cal = ProfileLatencyModel([calibrate(BASE, rounds, unit="ratio")])
    for batch, ratio in ((1, 1.1), (2, 1.5), (4, 1.5)):
        for ctx in (0, 12):
            want = ratio * (model.round_ms("demo91", batch, ctx, 4) + batch * BASE.fixed_ms)
            got = cal.round_ms("demo91", batch, ctx, 4) + batch * cal.fixed_ms("demo91")
            assert got == pytest.approx(want, rel=1e-6), (batch, ctx)
    assert cal.jitter("demo91") == pytest.approx((1.0,) * JITTER_QUANTILES)  # no spread left once each batch is scaled


def test_too_few_rounds_or_bad_jitter_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least"):
        calibrate(BASE, timed_rounds([1.0] * (MIN_ROUNDS - 1)))
    cal = calibrate(BASE, timed_rounds([1.0, 1.1] * MIN_ROUNDS), unit="ratio")
    cal.jitter = [1.2, 1.0]
    path = tmp_path / "bad.json"
    save_profile(cal, path)
    with pytest.raises(ProfileError, match="jitter"):
        load_profiles(path)


def test_jitter_in_ms_is_each_rounds_excess_over_its_scaled_prediction(tmp_path):
    """The default unit: a slow round adds ms, whatever its length (a CPU's interruptions
    last about as long on a long round as on a short one)."""
    from turboserve.engine.executor import RoundPlan
    from turboserve.engine.profiled import ProfiledExecutor
    from turboserve.types import SessionSpec

    model = ProfileLatencyModel([BASE])
    rounds = []
    for i in range(60):  # batch 1 and batch 2 rounds, each at its scale, a third 30 ms late
        for batch in (1, 2):
            predicted = model.round_ms("demo91", batch, 4, 4) + batch * BASE.fixed_ms
            rounds.append((batch, 4, 4, predicted + (30.0 if i % 3 == 0 else 0.0)))
    cal = calibrate(BASE, rounds)
    assert cal.jitter_unit == "ms" and "jitter in ms" in cal.source
    assert statistics.median(cal.jitter) == pytest.approx(0.0) and cal.jitter[-1] == pytest.approx(30.0)
    assert load_profiles(_saved(cal, tmp_path))[0].jitter_unit == "ms"  # files keep the unit
    with pytest.raises(ValueError, match="unit"):
        calibrate(BASE, rounds, unit="percent")
    with pytest.raises(ProfileError, match="jitter_unit"):
        load_profiles(_saved(replace(cal, jitter_unit="percent"), tmp_path))
    # the executor adds the draw: every round of either batch is its table time + 0 or 30 ms
    ex = ProfiledExecutor(ProfileLatencyModel([replace(cal, jitter=[30.0, 30.0], jitter_by_batch={})]), seed=1)
    plain = ProfiledExecutor(ProfileLatencyModel([replace(cal, jitter=[])]))
    for batch in (1, 2):
        sids = [f"s{batch}.{k}" for k in range(batch)]
        for e in (ex, plain):
            for sid in sids:
                e.add_session(sid, SessionSpec(model="demo91"), "p")
        plan = RoundPlan("w", SessionSpec(model="demo91").compat_key, tuple(sids), (0,) * batch, (0,) * batch)
        assert ex.execute(plan).duration_ms == pytest.approx(plain.execute(plan).duration_ms + 30.0)


def test_each_batch_size_timed_often_enough_gets_its_own_jitter_table(tmp_path):
    """A pooled table carries the calibration workload's mix of batch sizes into another
    workload: batch 2's longer excess must not reach batch 1's rounds."""
    model = ProfileLatencyModel([BASE])
    rounds = []
    for i in range(60):  # a third of the rounds late: batch 1 by 10 ms, batch 2 by 40 ms
        for batch, late in ((1, 10.0), (2, 40.0)):
            predicted = model.round_ms("demo91", batch, 4, 4) + batch * BASE.fixed_ms
            rounds.append((batch, 4, 4, predicted + (late if i % 3 == 0 else 0.0)))
    cal = calibrate(BASE, rounds)
    assert set(cal.jitter_by_batch) == {1, 2} and cal.jitter_shared_by_batch == {}
    assert cal.jitter_by_batch[1][-1] == pytest.approx(10.0) and cal.jitter_by_batch[2][-1] == pytest.approx(40.0)
    assert cal.jitter[-1] == pytest.approx(40.0)  # the pooled table, for the batch sizes without one
    assert "own tables for batch [1, 2]" in cal.source
    back = load_profiles(_saved(cal, tmp_path))[0]
    assert set(back.jitter_by_batch) == {1, 2}
    for b in (1, 2):
        assert back.jitter_by_batch[b] == pytest.approx(cal.jitter_by_batch[b])
    assert calibrate(BASE, rounds, by_batch=False).jitter_by_batch == {}
    # one batch size with enough rounds: the pooled table is nearly its own, no tables
    few = [r for r in rounds if r[0] == 1] + [r for r in rounds if r[0] == 2][:10]
    assert calibrate(BASE, few).jitter_by_batch == {}
    # contention split: each kind's tables come from that kind's rounds
    shared = [i % 2 == 1 for i in range(len(rounds))]  # every batch-2 round begun beside another
    split = calibrate(BASE, rounds, shared=shared)
    assert split.jitter_by_batch == {} and split.jitter_shared_by_batch == {}  # one batch size per kind
    with pytest.raises(ProfileError, match="jitter_by_batch needs jitter"):
        load_profiles(_saved(replace(cal, jitter=[]), tmp_path))
    with pytest.raises(ProfileError, match="batch sizes >= 1"):
        load_profiles(_saved(replace(cal, jitter_by_batch={0: [1.0]}), tmp_path))
    with pytest.raises(ProfileError, match="ascending"):
        load_profiles(_saved(replace(cal, jitter_by_batch={2: [3.0, 1.0]}), tmp_path))


def test_the_executor_draws_from_the_table_of_the_rounds_batch_size():
    from turboserve.engine.executor import RoundPlan
    from turboserve.engine.profiled import ProfiledExecutor, SharedHost
    from turboserve.types import SessionSpec

    profile = replace(BASE, jitter_unit="ms", jitter=[5.0, 5.0], jitter_by_batch={2: [40.0, 40.0]},
                      jitter_shared=[7.0, 7.0], jitter_shared_by_batch={2: [70.0, 70.0]})
    now = [0.0]
    host = SharedHost(lambda: now[0])
    ex, other = (ProfiledExecutor(ProfileLatencyModel([profile]), host=host) for _ in range(2))
    plain = ProfiledExecutor(ProfileLatencyModel([replace(profile, jitter=[], jitter_shared=[], jitter_by_batch={},
                                                          jitter_shared_by_batch={})]))
    spec = SessionSpec(model="demo91")
    other.add_session("o", spec, "p")
    o_chunks = iter(range(10))
    for batch, alone_ms, beside_ms in ((1, 5.0, 7.0), (2, 40.0, 70.0), (3, 5.0, 7.0)):
        sids = tuple(f"b{batch}.{k}" for k in range(batch))
        for e in (ex, plain):
            for sid in sids:
                e.add_session(sid, spec, "p")
        for idx, busy, extra_ms in ((0, False, alone_ms), (1, True, beside_ms)):
            now[0] += 100.0  # every engine's rounds are over
            if busy:  # the other engine of the host begins a round
                other.execute(RoundPlan("w", spec.compat_key, ("o",), (next(o_chunks),), (0,)))
            plan = RoundPlan("w", spec.compat_key, sids, (idx,) * batch, (0,) * batch)
            assert ex.execute(plan).duration_ms == pytest.approx(plain.execute(plan).duration_ms + extra_ms)


def _saved(profile, tmp_path):
    path = tmp_path / "saved.json"
    save_profile(profile, path)
    return path


def test_quantiles_include_both_ends():
    assert quantiles([3.0, 1.0, 2.0], 5) == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert quantiles([2.0], 3) == [2.0, 2.0, 2.0]


def test_the_simulator_draws_round_times_from_the_jitter():
    records = synth_trace(SynthConfig(hours=0.1, seed=3, rate_per_min=20.0))
    cfg = load_config(None, ["cluster.gpus=2", "sim.progress=false"])
    plain = load_latency_model()
    plain.add_profile(BASE)
    exact = simulate(records, "static-ll", plain, cfg).summary
    cal = calibrate(BASE, timed_rounds([1.0] * 80 + [1.6] * 20), unit="ratio")
    model = load_latency_model()
    model.add_profile(cal)
    a = simulate(records, "static-ll", model, cfg).summary
    b = simulate(records, "static-ll", model, cfg).summary
    assert all(a[k] == b[k] for k in a if not k.startswith("decision_ms"))  # seeded: a run repeats
    assert a["rounds_cruised"] == 0 and exact["rounds_cruised"] > 0  # drawn rounds are never alike
    # the same median round: the typical chunk moves by what the slow rounds add, the tail more
    assert exact["p50_chunk_latency_ms"] <= a["p50_chunk_latency_ms"] <= 1.6 * exact["p50_chunk_latency_ms"]
    assert a["p99_chunk_latency_ms"] > 1.3 * exact["p99_chunk_latency_ms"]
    other = simulate(records, "static-ll", model, load_config(None, ["cluster.gpus=2", "sim.progress=false",
                                                                      "sim.seed=1"])).summary
    assert other["mean_chunk_latency_ms"] != a["mean_chunk_latency_ms"]  # another seed, other draws


def test_recorded_rounds_read_back_and_a_bad_line_is_named(tmp_path):
    from types import SimpleNamespace

    from turboserve.profile.calibrate import RoundRecorder, read_rounds
    from turboserve.types import SessionSpec

    model = load_latency_model()
    key = SessionSpec(model="demo91").compat_key
    rec = RoundRecorder(tmp_path / "r.jsonl", model)
    rec("w0", SimpleNamespace(key=key, chunk_indices=(0, 20), duration_ms=80.0))
    rec("w0", SimpleNamespace(key=key, chunk_indices=(), duration_ms=0.0))  # nothing ran: not a round
    rec.close()
    rec("w0", SimpleNamespace(key=key, chunk_indices=(1,), duration_ms=50.0))  # after close: dropped
    window_ctx = model.context_after("demo91", 20)
    assert read_rounds(tmp_path / "r.jsonl", "demo91") == [(2, window_ctx / 2, 4, 80.0)]
    assert read_rounds(tmp_path / "r.jsonl", "tiny") == []
    (tmp_path / "r.jsonl").write_text('{"shape": "demo91", "batch": 1}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:1: not a timed round"):
        read_rounds(tmp_path / "r.jsonl", "demo91")


def test_busy_at_start_tells_rounds_begun_beside_another_worker():
    rounds = [("a", 0.0, 1.0), ("b", 0.5, 1.5), ("a", 1.0, 2.0), ("b", 2.5, 3.0), ("a", 2.6, 2.7)]
    # b's first begins in a's; a's second in b's first; b's second alone; a's third in b's
    assert busy_at_start(rounds) == [False, True, True, False, True]
    assert busy_at_start([("a", 0.0, 1.0), ("a", 0.5, 1.5)]) == [False, False]  # own rounds do not count


def test_rounds_begun_beside_another_engine_get_their_own_jitter(tmp_path):
    alone, beside = [1.0] * 50 + [1.2] * 10, [1.4] * 40 + [2.0] * 10
    rounds = timed_rounds(alone + beside)
    shared = [False] * len(alone) + [True] * len(beside)
    cal = calibrate(BASE, rounds, shared=shared, unit="ratio")
    scale = statistics.median(alone + beside)
    assert statistics.median(cal.jitter) == pytest.approx(1.0 / scale)
    assert statistics.median(cal.jitter_shared) == pytest.approx(1.4 / scale)
    assert "begun beside another engine" in cal.source
    save_profile(cal, tmp_path / "p.json")
    assert load_profiles(tmp_path / "p.json")[0].jitter_shared == pytest.approx(cal.jitter_shared)
    # too few of one kind: one distribution for all, as without flags
    few = calibrate(BASE, rounds[:len(alone) + 5], shared=shared[:len(alone) + 5], unit="ratio")
    assert few.jitter_shared == [] and few.jitter == calibrate(BASE, rounds[:len(alone) + 5], unit="ratio").jitter
    with pytest.raises(ValueError, match="flags"):
        calibrate(BASE, rounds, shared=shared[:-1])
    with pytest.raises(ProfileError, match="jitter_shared needs jitter"):
        save_profile(replace(cal, jitter=[]), tmp_path / "q.json")
        load_profiles(tmp_path / "q.json")


def test_the_executor_draws_the_shared_jitter_while_another_engine_is_mid_round():
    from turboserve.engine.executor import RoundPlan
    from turboserve.engine.profiled import ProfiledExecutor, SharedHost
    from turboserve.types import SessionSpec

    model = ProfileLatencyModel([replace(BASE, jitter=[1.0, 1.0], jitter_shared=[3.0, 3.0])])
    now = [0.0]
    host = SharedHost(lambda: now[0])
    a, b = ProfiledExecutor(model, host=host), ProfiledExecutor(model, host=host)
    spec = SessionSpec(model="demo91")
    a.add_session("x", spec, "p")
    b.add_session("y", spec, "p")

    def plan(sid, idx):
        return RoundPlan("w", spec.compat_key, (sid,), (idx,), (0,))

    base = a.round_ms("demo91", 1, 0.0, 4)
    first = a.execute(plan("x", 0)).duration_ms
    assert first == pytest.approx(base)  # alone
    assert b.execute(plan("y", 0)).duration_ms == pytest.approx(3 * base)  # a is mid-round
    now[0] = 10.0  # both done
    assert a.execute(plan("x", 1)).duration_ms == pytest.approx(base)
    alone = ProfiledExecutor(model)  # no host: every round from `jitter`
    alone.add_session("z", spec, "p")
    assert alone.execute(plan("z", 0)).duration_ms == pytest.approx(base)


def test_recorded_rounds_carry_their_worker_and_time(tmp_path):
    from types import SimpleNamespace

    from turboserve.profile.calibrate import RoundRecorder, read_timed_rounds
    from turboserve.types import SessionSpec

    key = SessionSpec(model="demo91").compat_key
    path = tmp_path / "r.jsonl"
    rec = RoundRecorder(path, load_latency_model())
    rec("w0", SimpleNamespace(key=key, chunk_indices=(0,), duration_ms=5000.0))  # long: w1's begins in it
    rec("w1", SimpleNamespace(key=key, chunk_indices=(0,), duration_ms=1.0))
    rec.close()
    rounds, shared = read_timed_rounds(path, "demo91")
    assert len(rounds) == 2 and shared == [False, True]
    path.write_text('{"shape": "demo91", "batch": 1, "context_frames": 0, "steps": 4, "round_ms": 50}\n')
    assert read_timed_rounds(path, "demo91")[1] is None  # an older file: no flags


def test_calibrating_from_the_command_line_with_and_without_the_contention_split(tmp_path):
    from types import SimpleNamespace

    from turboserve.cli import main
    from turboserve.profile.calibrate import RoundRecorder
    from turboserve.types import SessionSpec

    key = SessionSpec(model="demo91").compat_key
    path = tmp_path / "r.jsonl"
    rec = RoundRecorder(path, load_latency_model())
    for i in range(40):  # w0's long rounds: every w1 round begins beside one of them
        rec("w0", SimpleNamespace(key=key, chunk_indices=(0,), duration_ms=5000.0 + i))
        rec("w1", SimpleNamespace(key=key, chunk_indices=(0,), duration_ms=100.0 + i))
    rec.close()
    split, iid = tmp_path / "split.json", tmp_path / "iid.json"
    assert main(["profile", "--calibrate", str(path), "--base", "demo91", "--out", str(split)]) == 0
    assert main(["profile", "--calibrate", str(path), "--base", "demo91", "--out", str(iid),
                 "--no-contention"]) == 0
    assert load_profiles(split)[0].jitter_shared and load_profiles(split)[0].jitter
    assert load_profiles(iid)[0].jitter_shared == [] and load_profiles(iid)[0].jitter


def test_pooled_jitter_from_the_command_line(tmp_path):
    from types import SimpleNamespace

    from turboserve.cli import main
    from turboserve.profile.calibrate import MIN_JITTER_BATCH_ROUNDS, RoundRecorder
    from turboserve.types import SessionSpec

    key = SessionSpec(model="demo91").compat_key
    path = tmp_path / "r.jsonl"
    rec = RoundRecorder(path, load_latency_model())
    for i in range(MIN_JITTER_BATCH_ROUNDS):  # batch 1 and batch 2 rounds, each often enough
        rec("w0", SimpleNamespace(key=key, chunk_indices=(0,), duration_ms=100.0 + i))
        rec("w0", SimpleNamespace(key=key, chunk_indices=(0, 0), duration_ms=200.0 + 3 * i))
    rec.close()
    own, pooled = tmp_path / "own.json", tmp_path / "pooled.json"
    assert main(["profile", "--calibrate", str(path), "--base", "demo91", "--out", str(own)]) == 0
    assert main(["profile", "--calibrate", str(path), "--base", "demo91", "--out", str(pooled),
                 "--pooled-jitter"]) == 0
    assert set(load_profiles(own)[0].jitter_by_batch) == {1, 2}
    assert load_profiles(pooled)[0].jitter_by_batch == {} and load_profiles(pooled)[0].jitter
