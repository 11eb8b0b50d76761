"""ProfileLatencyModel: exact at table points, monotone, extrapolation and scaling rules,
memoization, and the capacity claims of DESIGN.md checked against the measured H100 data."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turboserve.policy.latency import LatencyModel, ShapeInfo
from turboserve.profile import load_latency_model
from turboserve.profile.format import RoundPoint, ShapeProfile
from turboserve.profile.model import ProfileLatencyModel

MODEL = load_latency_model()
H100_SHAPES = ("demo91", "wan1.3b-320p", "wan1.3b-480p", "wan14b-480p")


def _profile(name="toy", rounds=(), fixed_ms=0.0, window=12, passes=5, lf=3) -> ShapeProfile:
    info = ShapeInfo(name, lf, 4 * lf, 16.0, window, passes, weights_bytes=10**9, gpu_memory_bytes=10**10)
    return ShapeProfile(info, [RoundPoint(*r) for r in rounds], fixed_ms=fixed_ms,
                        state_bytes=[(3.0, 3 * 10**8), (12.0, 12 * 10**8)], activation_bytes=[(1, 10**8), (4, 3 * 10**8)])


TOY = _profile(rounds=[(1, 0, 100.0), (2, 0, 180.0), (4, 0, 340.0), (1, 9, 150.0), (2, 9, 280.0), (4, 9, 540.0)])


def test_implements_the_protocol():
    assert isinstance(MODEL, ProfileLatencyModel)
    _: LatencyModel = MODEL  # structural: every protocol method exists
    for meth in ("shape", "round_ms", "fixed_ms", "state_bytes", "activation_bytes", "context_after", "capacity"):
        assert callable(getattr(MODEL, meth))


def test_exact_at_table_points_where_table_is_monotone():
    for name in ("wan1.3b-320p", "wan1.3b-480p", "wan14b-480p"):
        for r in MODEL.profile(name).rounds:
            assert MODEL.round_ms(name, r.batch, r.context_frames, 4) == pytest.approx(r.round_ms), (name, r)


def test_noisy_table_becomes_its_upper_envelope():
    # demo91 raw: batch 4 at context 0 (58.79 ms) is faster than batch 2 (65.49 ms)
    assert MODEL.round_ms("demo91", 4, 0, 4) == pytest.approx(65.49)
    assert MODEL.round_ms("demo91", 32, 12, 4) == pytest.approx(199.58)  # the measured point
    # every point is >= its raw measurement
    for r in MODEL.profile("demo91").rounds:
        assert MODEL.round_ms("demo91", r.batch, r.context_frames, 4) >= r.round_ms - 1e-9


def test_bilinear_interpolation_and_extrapolation():
    m = ProfileLatencyModel([TOY])
    assert m.round_ms("toy", 3, 0, 4) == pytest.approx(260.0)
    assert m.round_ms("toy", 2, 4.5, 4) == pytest.approx(230.0)
    assert m.round_ms("toy", 3, 4.5, 4) == pytest.approx((260.0 + 410.0) / 2)
    # beyond the table in batch: slope of the last two points (80 ms/session at context 0)
    assert m.round_ms("toy", 8, 0, 4) == pytest.approx(340.0 + 4 * 80.0)
    # clamped in context
    assert m.round_ms("toy", 1, 50, 4) == pytest.approx(150.0)
    assert m.round_ms("toy", 0, 5, 4) == 0.0


def test_steps_scale_by_passes():
    m = ProfileLatencyModel([TOY])
    assert m.round_ms("toy", 1, 0, 2) == pytest.approx(100.0 * 3 / 5)
    assert m.round_ms("toy", 1, 0, 4) == pytest.approx(100.0)
    assert MODEL.round_ms("wan1.3b-480p", 1, 18, 2) == pytest.approx(488.07 * 3 / 5)


def test_sparse_table_is_filled_along_batch():
    m = ProfileLatencyModel([_profile(rounds=[(1, 0, 100.0), (4, 0, 250.0), (2, 9, 300.0)])])
    # context 9 has one point: proportional in batch
    assert m.round_ms("toy", 4, 9, 4) == pytest.approx(600.0)
    assert m.round_ms("toy", 2, 0, 4) == pytest.approx(150.0)


@settings(max_examples=300, deadline=None)
@given(shape=st.sampled_from(H100_SHAPES), b=st.integers(1, 80), db=st.integers(0, 20),
       c=st.floats(0, 30), dc=st.floats(0, 30), steps=st.sampled_from([1, 2, 4]))
def test_monotone_in_batch_and_context(shape, b, db, c, dc, steps):
    base = MODEL.round_ms(shape, b, c, steps)
    assert MODEL.round_ms(shape, b + db, c, steps) >= base - 1e-9
    assert MODEL.round_ms(shape, b, c + dc, steps) >= base - 1e-9
    assert MODEL.state_bytes(shape, c + dc) >= MODEL.state_bytes(shape, c)
    assert MODEL.activation_bytes(shape, b + db) >= MODEL.activation_bytes(shape, b)


def test_memory_model():
    assert MODEL.state_bytes("demo91", 13) == 218050560  # measured: 12 cached + 1 chunk frame
    assert MODEL.state_bytes("wan1.3b-480p", 100) == MODEL.state_bytes("wan1.3b-480p", 21)  # window
    assert MODEL.state_bytes("wan1.3b-480p", 0) == 0
    assert MODEL.context_after("wan1.3b-480p", 0) == 0
    assert MODEL.context_after("wan1.3b-480p", 2) == 6
    assert MODEL.context_after("wan1.3b-480p", 50) == 21
    assert MODEL.context_after("demo91", 5) == 5
    assert MODEL.activation_bytes("wan1.3b-480p", 1) > 0
    # 14B at 480p: 28 GB of weights + 27 GB of full-window KV: one session fits, two do not
    assert MODEL.memory_capacity("wan14b-480p") == 1


def test_on_another_gpu_memory_binds_capacity_there():
    one = ProfileLatencyModel([MODEL.profile("demo91")])
    assert one.on_gpu(MODEL.shape("demo91").gpu_memory_bytes) is one  # the profiled GPU: as it is
    small = MODEL.on_gpu(7 * 10**9)  # wan1.3b-320p: 2.8 GB of weights, 2.8 GB per session
    shape = "wan1.3b-320p"
    slo = MODEL.shape(shape).chunk_ms
    assert MODEL.capacity(shape, slo, 4) == 2 and MODEL.memory_capacity(shape) > 2
    assert small.memory_capacity(shape) == 1 and small.capacity(shape, slo, 4) == 1
    assert small.shape(shape).gpu_memory_bytes == 7 * 10**9
    assert small.round_ms(shape, 3, 10.0, 4) == MODEL.round_ms(shape, 3, 10.0, 4)  # the same tables


def test_capacity_claims_of_design():
    """DESIGN.md: demo91 ~30 sessions/GPU within 250 ms; 320p 3-5 within 750 ms (VAE included
    or not); 480p 1.3B exactly 1 within 750 ms; 14B at 480p: 0."""
    def round_only(shape):  # capacity with the VAE decode left out
        w = MODEL.shape(shape).window_frames
        slo = MODEL.shape(shape).chunk_ms
        return max(b for b in range(0, 200) if b == 0 or MODEL.round_ms(shape, b, w, 4) <= slo)

    # demo91: 32 measured sessions take 199.6 ms at a full window, within 250 ms
    assert MODEL.round_ms("demo91", 32, 13, 4) <= 250.0
    assert round_only("demo91") == 41  # extrapolated past the measured 32
    # with the VAE estimate (4.5 ms/session, pixel-scaled) the data give 22, below "~30"
    assert MODEL.capacity("demo91", 250.0, 4) == 22
    assert 3 <= round_only("wan1.3b-320p") <= 5
    # with the 106 ms pixel-scaled VAE estimate the data give 2, below the claimed 3-5
    assert MODEL.capacity("wan1.3b-320p", 750.0, 4) == 2
    assert MODEL.capacity("wan1.3b-480p", 750.0, 4) == 1
    assert round_only("wan1.3b-480p") == 1
    assert MODEL.capacity("wan14b-480p", 750.0, 4) == 0
    assert round_only("wan14b-480p") == 0


def test_capacity_rule_on_toy():
    m = ProfileLatencyModel([_profile(rounds=TOY.rounds and [(r.batch, r.context_frames, r.round_ms) for r in TOY.rounds], fixed_ms=10.0)])
    # full window (12) -> clamped to context 9: b=2 -> 280 + 20 = 300
    assert m.capacity("toy", 300.0, 4) == 2
    assert m.capacity("toy", 299.9, 4) == 1
    assert m.capacity("toy", 159.0, 4) == 0
    # fewer steps, more sessions: b=4 -> 540*0.6 + 40 = 364
    assert m.capacity("toy", 364.0, 2) == 4


def test_unknown_shape_lists_known():
    with pytest.raises(ValueError, match="demo91"):
        MODEL.round_ms("nope", 1, 0, 4)


def test_memo_is_cleared_by_add_profile():
    m = ProfileLatencyModel([TOY])
    assert m.round_ms("toy", 1, 0, 4) == pytest.approx(100.0)
    m.add_profile(_profile(rounds=[(1, 0, 50.0)]))
    assert m.round_ms("toy", 1, 0, 4) == pytest.approx(50.0)
