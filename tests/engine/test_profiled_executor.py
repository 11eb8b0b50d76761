"""ProfiledExecutor: durations and bytes are the latency model's, frames tag session and chunk."""

from __future__ import annotations

import pytest

from turboserve.config import TurboConfig
from turboserve.engine.executor import ChunkOutput, RoundPlan
from turboserve.engine.profiled import ProfiledExecutor, chunk_output, read_tag, session_tag
from turboserve.policy.latency import transfer_ms
from turboserve.policy.load import GroupLoad, group_round_ms
from turboserve.profile import load_latency_model
from turboserve.types import SessionSpec

MODEL = load_latency_model()
CFG = TurboConfig()


@pytest.mark.parametrize("shape", ["demo91", "wan1.3b-320p", "wan1.3b-480p"])
def test_round_duration_equals_the_model(shape):
    ex = ProfiledExecutor(MODEL, CFG)
    spec = SessionSpec(model=shape, steps=4)
    sids = [f"s{i}" for i in range(5)]
    for sid in sids:
        ex.add_session(sid, spec, "p")
    ctx = (0, 3, 6, 9, 12)
    res = ex.execute(RoundPlan("w", spec.compat_key, tuple(sids), (0,) * 5, ctx))
    want = MODEL.round_ms(shape, 5, sum(ctx) / 5, 4) + 5 * MODEL.fixed_ms(shape)
    assert res.duration_ms == pytest.approx(want)
    # the same number the policies' load function predicts for this group
    assert res.duration_ms == pytest.approx(
        group_round_ms(GroupLoad(spec.compat_key, 5, float(sum(ctx))), MODEL, 32))
    assert [o.chunk_index for o in res.outputs] == [0] * 5 and not res.errors
    assert all(o.frames is None for o in res.outputs)


def test_state_bytes_and_host_transfers_follow_the_model_and_link():
    ex = ProfiledExecutor(MODEL, CFG)
    spec = SessionSpec(model="wan1.3b-480p")
    nbytes = ex.add_session("s", spec, "p")
    assert nbytes == MODEL.state_bytes("wan1.3b-480p", MODEL.shape("wan1.3b-480p").window_frames)
    host = CFG.link("host")
    off = ex.offload("s")
    assert off.nbytes == nbytes
    assert off.duration_ms == pytest.approx(transfer_ms(nbytes, host.alpha_ms, host.bandwidth_gbps))
    with pytest.raises(ValueError, match="already offloaded"):
        ex.offload("s")
    res = ex.execute(RoundPlan("w", spec.compat_key, ("s",), (0,), (0,)))
    assert "offloaded" in res.errors["s"]
    assert ex.restore("s").duration_ms == off.duration_ms


def test_frames_tag_session_and_chunk_and_order_is_checked():
    ex = ProfiledExecutor(MODEL, CFG, frames=True)
    spec = SessionSpec(model="demo91")
    ex.add_session("alpha", spec, "p")
    for idx in range(3):
        (out,) = ex.execute(RoundPlan("w", spec.compat_key, ("alpha",), (idx,), (0,))).outputs
        assert out.frames.shape == (1, 8, 8, 3) and out.frames.dtype.name == "uint8"
        assert read_tag(out.frames) == (session_tag("alpha"), idx)
    res = ex.execute(RoundPlan("w", spec.compat_key, ("alpha",), (7,), (0,)))
    assert "chunk 3" in res.errors["alpha"] and not res.outputs


def test_export_import_and_checkpoint_keep_the_chunk_index():
    a, b = ProfiledExecutor(MODEL, CFG), ProfiledExecutor(MODEL, CFG)
    spec = SessionSpec(model="demo91")
    a.add_session("s", spec, "hello")
    a.execute(RoundPlan("w", spec.compat_key, ("s",), (0,), (0,)))
    blob = a.export_state("s")
    assert (blob.chunk_index, blob.prompt) == (1, "hello")
    assert b.import_state(blob) == blob.nbytes
    c = ProfiledExecutor(MODEL, CFG)
    c.rebuild("s", a.checkpoint("s"))
    for ex in (b, c):
        assert not ex.execute(RoundPlan("w", spec.compat_key, ("s",), (1,), (1,))).errors


def test_unknown_shape_is_a_clear_error():
    ex = ProfiledExecutor(MODEL, CFG)
    with pytest.raises((KeyError, ValueError), match="nosuch"):
        ex.add_session("s", SessionSpec(model="nosuch"), "p")


def test_fast_chunk_output_equals_the_dataclass():
    fast, made = chunk_output("s1", 3), ChunkOutput("s1", 3)
    assert fast == made and hash(fast) == hash(made) and repr(fast) == repr(made)
    assert chunk_output("s1", 3, "f").frames == "f" and fast != chunk_output("s1", 4)
