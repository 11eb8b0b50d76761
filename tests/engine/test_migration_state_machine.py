"""Migration state machine: commit continues the video on the destination; every abort
leaves the session intact and producing chunks on the source."""

from __future__ import annotations

import pytest

from turboserve.config import TurboConfig
from turboserve.engine.core import EngineCore
from turboserve.engine.migration import (ABORT_REASONS, Migration, MigrationError, Phase, delta_bytes)
from turboserve.engine.profiled import ProfiledExecutor, read_tag, session_tag
from turboserve.policy.latency import transfer_ms
from turboserve.profile import load_latency_model
from turboserve.types import SessionSpec

MODEL = load_latency_model()
CFG = TurboConfig()
LINK = CFG.link("gpu")
SPEC = SessionSpec(model="wan1.3b-320p", frames_per_chunk=12, steps=4)
GB = 10**9


def engines(dst_memory: int = 70 * GB) -> tuple[EngineCore, EngineCore]:
    src = EngineCore("src", ProfiledExecutor(MODEL, CFG, frames=True), memory_bytes=70 * GB)
    dst = EngineCore("dst", ProfiledExecutor(MODEL, CFG, frames=True), memory_bytes=dst_memory)
    return src, dst


def run(eng: EngineCore, now: float):
    rnd = eng.begin_round(now)
    return None if rnd is None else eng.finish_round(rnd, rnd.finish_s)


def chunks_of(outs, sid="s"):
    got = []
    for out in outs:
        for d in out.deliveries:
            if d.session_id == sid:
                assert read_tag(d.frames) == (session_tag(sid), d.chunk_index)
                got.append(d.chunk_index)
    return got


def test_commit_moves_the_session_and_the_video_continues():
    src, dst = engines()
    src.add_session("s", SPEC, "p", 0.0)
    src.add_session("other", SPEC, "p", 0.0)
    outs = [run(src, 0.0)]
    mig = Migration("s", src, dst, link=LINK)
    nbytes = src.info("s").state_bytes
    pre_ms = mig.start(outs[-1].finished_s)
    assert mig.phase is Phase.PRECOPY and pre_ms == pytest.approx(transfer_ms(nbytes, LINK.alpha_ms, LINK.bandwidth_gbps))
    assert dst.pool.reserved_bytes == nbytes
    # pre-copy: the session keeps generating on the source (two more chunks)
    outs += [run(src, outs[-1].finished_s), run(src, outs[-1].finished_s)]
    assert chunks_of(outs) == [0, 1, 2]
    assert mig.begin_stop()  # at a chunk boundary now
    t_stop = outs[-1].finished_s
    down = mig.stop_and_copy(t_stop)
    assert mig.phase is Phase.STOP_AND_COPY
    delta = delta_bytes(MODEL, "wan1.3b-320p", nbytes, 2)
    assert 0 < delta < nbytes
    assert down == pytest.approx(transfer_ms(delta, LINK.alpha_ms, LINK.bandwidth_gbps))
    # held: the source does not schedule it any more
    held_round = run(src, t_stop)
    assert "s" not in held_round.session_ids
    rep = mig.commit(t_stop + down / 1000)
    assert rep.ok and rep.bytes_moved == nbytes + delta and rep.downtime_ms == pytest.approx(down)
    ev = rep.to_event()
    assert (ev.ok, ev.src, ev.dst, ev.downtime_ms) == (True, "src", "dst", rep.downtime_ms)
    assert "s" not in src and src.pool.bytes_of("s") == 0
    assert dst.pool.bytes_of("s") == nbytes and dst.pool.reserved_bytes == 0
    nxt = run(dst, t_stop + down / 1000)
    assert nxt.chunk_indices == (3,)
    # its next chunk was due when chunk 2 was delivered: downtime shows in its latency
    assert nxt.due_s == (t_stop,)
    assert chunks_of(outs + [nxt]) == [0, 1, 2, 3]


def test_stop_waits_for_the_chunk_boundary():
    src, dst = engines()
    src.add_session("s", SPEC, "p", 0.0)
    mig = Migration("s", src, dst, link=LINK)
    mig.start(0.0)
    rnd = src.begin_round(0.0)  # chunk 0 in flight
    assert not mig.begin_stop()
    with pytest.raises(MigrationError, match="in flight"):
        mig.stop_and_copy(0.0)
    out = src.finish_round(rnd, rnd.finish_s)
    assert out.chunk_indices == (0,)
    assert not src.has_due_work()  # the hold took effect at the boundary
    assert mig.ready_to_stop()
    mig.stop_and_copy(rnd.finish_s)
    assert mig.commit(rnd.finish_s).ok
    assert run(dst, rnd.finish_s).chunk_indices == (1,)


@pytest.mark.parametrize("reason", ["dst_lost", "transfer_failed"])
@pytest.mark.parametrize("when", ["precopy", "stop_and_copy"])
def test_abort_leaves_session_running_on_source(reason, when):
    src, dst = engines()
    src.add_session("s", SPEC, "p", 0.0)
    outs = [run(src, 0.0)]
    mig = Migration("s", src, dst, link=LINK)
    mig.start(outs[-1].finished_s)
    if when == "stop_and_copy":
        mig.begin_stop()
        mig.stop_and_copy(outs[-1].finished_s)
        assert not src.has_due_work()
    rep = mig.abort(reason, outs[-1].finished_s + 0.5)
    assert not rep.ok and rep.reason == reason and mig.phase is Phase.ABORTED
    assert dst.pool.reserved_bytes == 0 and "s" not in dst
    outs += [run(src, outs[-1].finished_s + 0.5), run(src, 10.0)]
    assert chunks_of(outs) == [0, 1, 2]
    assert mig.abort("dst_lost", 11.0) is rep  # idempotent once done
    with pytest.raises(MigrationError):
        mig.commit(11.0)


def test_destination_without_memory_aborts_at_start():
    src, dst = engines(dst_memory=1 * GB)
    src.add_session("s", SPEC, "p", 0.0)
    mig = Migration("s", src, dst, link=LINK)
    assert mig.start(0.0) == 0.0
    assert mig.done and mig.report.reason == "dst_no_memory"
    assert chunks_of([run(src, 0.0)]) == [0]


def test_failing_data_move_aborts_with_transfer_failed():
    src, dst = engines()
    src.add_session("s", SPEC, "p", 0.0)

    def broken(blob):
        raise ConnectionError("peer reset")

    mig = Migration("s", src, dst, link=LINK, transfer=broken)
    rep = mig.run(0.0)
    assert not rep.ok and rep.reason == "transfer_failed" and "peer reset" in mig.reason_detail
    assert chunks_of([run(src, 0.0)]) == [0] and dst.pool.used_bytes == 0


def test_session_closed_and_bad_reason():
    src, dst = engines()
    src.add_session("s", SPEC, "p", 0.0)
    mig = Migration("s", src, dst, link=LINK)
    mig.start(0.0)
    src.remove("s")
    assert mig.abort("session_closed", 0.1).reason == "session_closed"
    assert dst.pool.reserved_bytes == 0
    with pytest.raises(ValueError, match="unknown abort reason"):
        Migration("s", src, dst, link=LINK).abort("bored", 0.0)
    assert set(ABORT_REASONS) == {"dst_no_memory", "dst_lost", "src_lost", "transfer_failed", "session_closed"}


def test_pause_while_held_is_carried_to_the_destination():
    src, dst = engines()
    src.add_session("s", SPEC, "p", 0.0, chunks_wanted=5)
    mig = Migration("s", src, dst, link=LINK)
    mig.start(0.0)
    mig.begin_stop()
    mig.stop_and_copy(0.0)
    src.pause("s", 0.01)
    mig.commit(0.02)
    assert not dst.info("s").active and not dst.has_due_work()


# --- exactly once and in order across migrations, whatever the interleaving ---------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

steps = st.lists(st.sampled_from(["src_begin", "src_finish", "dst_round", "start", "begin_stop", "stop",
                                  "commit", "abort", "pause", "activate"]), min_size=5, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_chunks_once_and_in_order_across_migration_phases(seq):
    src, dst = engines()
    for sid in ("s", "t"):
        src.add_session(sid, SPEC, "p", 0.0)
    got: dict[str, list[int]] = {"s": [], "t": []}
    now = 0.0
    rnd = None
    mig = None

    def record(out):
        for d in out.deliveries:
            assert read_tag(d.frames) == (session_tag(d.session_id), d.chunk_index)
            got[d.session_id].append(d.chunk_index)

    for step in seq:
        now += 0.1
        if step == "src_begin" and rnd is None:
            rnd = src.begin_round(now)
        elif step == "src_finish" and rnd is not None:
            record(src.finish_round(rnd, now))
            rnd = None
        elif step == "dst_round":
            r = dst.begin_round(now)
            if r is not None:
                record(dst.finish_round(r, now))
        elif step == "start" and (mig is None or mig.done) and "s" in src:
            mig = Migration("s", src, dst, link=LINK)
            mig.start(now)
        elif mig is None or mig.done:
            if step in ("pause", "activate"):
                eng = src if "s" in src else dst
                eng.pause("s", now) if step == "pause" else eng.activate("s", now)
            continue
        elif step == "begin_stop" and mig.phase is Phase.PRECOPY:
            mig.begin_stop()
        elif step == "stop" and mig.ready_to_stop():
            mig.stop_and_copy(now)
        elif step == "commit" and mig.phase is Phase.STOP_AND_COPY:
            mig.commit(now)
        elif step == "abort":
            mig.abort("dst_lost", now)
        elif step in ("pause", "activate"):
            src.pause("s", now) if step == "pause" else src.activate("s", now)
        assert src.pool.used_bytes <= src.pool.capacity_bytes and dst.pool.used_bytes <= dst.pool.capacity_bytes
        assert ("s" in src) != ("s" in dst) or (mig is not None and not mig.done)

    if rnd is not None:
        record(src.finish_round(rnd, now))
    if mig is not None and not mig.done:
        mig.abort("dst_lost", now)
    assert ("s" in src) != ("s" in dst)
    assert dst.pool.reserved_bytes == 0
    for sid, idxs in got.items():
        assert idxs == list(range(len(idxs))), f"{sid}: {idxs}"
    home = src if "s" in src else dst
    assert home.info("s").chunk_index == len(got["s"])
