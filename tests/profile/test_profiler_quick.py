"""`turboserve profile --quick` on CPU with `tiny`: the file it writes is a usable profile."""

from __future__ import annotations

import json

import pytest
import torch

from turboserve.cli import main
from turboserve.profile.format import FORMAT, TRANSFER_KEYS, load_profiles
from turboserve.profile.model import ProfileLatencyModel


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core CI box: contended OpenMP threads distort timings
    yield
    torch.set_num_threads(before)


def test_quick_profile_loads_and_drives_the_latency_model(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    assert main(["profile", "--model", "tiny", "--device", "cpu", "--out", str(out), "--quick"]) == 0
    assert json.loads(out.read_text())["format"] == FORMAT
    (p,) = load_profiles(out)
    s = p.shape
    assert (s.name, s.latent_frames_per_chunk, s.video_frames_per_chunk, s.window_frames, s.passes) == ("tiny", 1, 4, 6, 5)
    assert s.fps == 16.0 and s.weights_bytes > 100_000 and s.gpu_memory_bytes > 2**30
    # --quick: batches 1 and 2, at an empty cache and at the window's steady state (5 frames cached)
    assert sorted((r.batch, r.context_frames) for r in p.rounds) == [(1, 0.0), (1, 5.0), (2, 0.0), (2, 5.0)]
    assert all(r.round_ms > 0 for r in p.rounds)
    assert p.fixed_ms > 0, "the VAE decode of a chunk costs time and is reported apart"
    # state grows with the cache and stays flat once the rolling window is full
    by_ctx = dict(p.state_bytes)
    assert by_ctx[5.0] > by_ctx[1.0] > by_ctx[0.0] > 0 and by_ctx[6.0] - by_ctx[5.0] < by_ctx[1.0] - by_ctx[0.0]
    for key in TRANSFER_KEYS + ("offload_gbps", "restore_gbps", "migration_gbps"):
        assert p.transfer[key] > 0, key
    model = ProfileLatencyModel([p])
    assert model.round_ms("tiny", 2, 5, 4) > 0
    assert model.state_bytes("tiny", 6) == by_ctx[6.0]
    assert model.fixed_ms("tiny") == p.fixed_ms
    assert "shape tiny" in capsys.readouterr().out


def test_plan_and_spec_options_choose_what_is_measured(tmp_path, capsys):
    """--batches/--contexts pick the grid, --size the resolution (state bytes scale with the
    tokens per frame), --name the shape name; a bad value is a clear error."""
    out = tmp_path / "small.json"
    assert main(["profile", "--model", "tiny", "--out", str(out), "--quick", "--batches", "3",
                 "--contexts", "2", "--size", "32x32", "--name", "tiny-32"]) == 0
    (p,) = load_profiles(out)
    assert p.shape.name == "tiny-32"
    assert sorted((r.batch, r.context_frames) for r in p.rounds) == [(3, 2.0)]
    (full,) = load_profiles(main_profile(tmp_path))
    # 32x32 holds a quarter of 64x64's tokens: a quarter of the KV cache per cached frame
    small, big = dict(p.state_bytes), dict(full.state_bytes)
    assert small[5.0] - small[0.0] < 0.3 * (big[5.0] - big[0.0])
    capsys.readouterr()
    assert main(["profile", "--model", "tiny", "--out", str(out), "--size", "32"]) == 2
    assert "--size takes WIDTHxHEIGHT" in capsys.readouterr().err
    assert main(["profile", "--model", "tiny", "--out", str(out), "--size", "40x32", "--quick"]) == 2
    assert "spec.width=40" in capsys.readouterr().err


def main_profile(tmp_path):
    out = tmp_path / "full.json"
    assert main(["profile", "--model", "tiny", "--out", str(out), "--quick", "--batches", "1",
                 "--contexts", "0"]) == 0
    return out
