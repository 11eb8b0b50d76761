"""Profile files: the own format round-trips, the shared reference format loads, errors name
the file and the field, and the shipped built-in shapes match what build_shapes makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from turboserve.profile import BUILTIN_SHAPES, load_latency_model, load_profiles, resolve_shape, save_profile
from turboserve.profile.build_shapes import build
from turboserve.profile.format import FORMAT, ProfileError

REPO = Path(__file__).resolve().parents[2]
SHARED_PROFILES = next((p for p in (REPO.parent / "shared" / "profiles", Path("/work/shared/profiles")) if p.is_dir()), None)
needs_shared = pytest.mark.skipif(SHARED_PROFILES is None, reason="../shared/profiles not present")


def test_builtin_shapes_ship_in_own_format():
    model = load_latency_model()
    for name in BUILTIN_SHAPES:
        assert name in model.shapes()
        p = model.profile(name)
        assert "H100" in p.source and "2026-11-22" in p.source
    assert model.shape("demo91").chunk_ms == pytest.approx(250.0)
    assert model.shape("wan1.3b-480p").chunk_ms == pytest.approx(750.0)
    assert model.shape("wan1.3b-480p").window_frames == 21
    # 6.0 GB of KV at a full 21-frame window, 1.3B at 480p
    assert model.state_bytes("wan1.3b-480p", 21) == pytest.approx(6.04e9, rel=0.01)


def test_own_format_round_trip(tmp_path):
    model = load_latency_model()
    p = model.profile("wan1.3b-320p")
    path = tmp_path / "x.json"
    save_profile(p, path)
    assert json.loads(path.read_text())["format"] == FORMAT
    (q,) = load_profiles(path)
    assert q.shape == p.shape
    assert sorted(q.rounds, key=repr) == sorted(p.rounds, key=repr)
    assert q.fixed_ms == p.fixed_ms and q.state_bytes == p.state_bytes
    assert q.activation_bytes == p.activation_bytes and q.transfer == p.transfer


@needs_shared
def test_shared_format_loads_every_model():
    names = set()
    for f in sorted(SHARED_PROFILES.glob("*.json")):
        for p in load_profiles(f):
            names.add(p.name)
            assert p.rounds and p.state_bytes
    assert {"wan1.3b", "wan14b", "wan1.3b-demo91", "wan1.3b-320p"} <= names
    big = {p.name: p for p in load_profiles(SHARED_PROFILES / "h100-wan-causal-dit.json")}
    assert big["wan1.3b"].shape.latent_frames_per_chunk == 3
    assert big["wan1.3b"].fixed_ms == pytest.approx(230.1, abs=1)  # the measured VAE decode
    assert big["wan1.3b"].transfer["d2h_pinned_gbps"] == pytest.approx(55.1)
    small = {p.name: p for p in load_profiles(SHARED_PROFILES / "h100-wan-causal-dit-small-shapes.json")}
    assert small["wan1.3b-demo91"].shape.latent_frames_per_chunk == 1


@needs_shared
def test_builtin_files_are_what_build_shapes_makes(tmp_path):
    written = build(SHARED_PROFILES, tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{n}.json" for n in BUILTIN_SHAPES)
    shipped = Path(__file__).resolve().parents[2] / "src" / "turboserve" / "profile" / "shapes"
    for p in written:
        assert json.loads(p.read_text()) == json.loads((shipped / p.name).read_text()), p.name


def test_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": FORMAT, "shape": {"name": "x"}, "rounds": [], "fixed_ms": 0}))
    with pytest.raises(ProfileError, match=r"bad\.json.*latent_frames_per_chunk"):
        load_profiles(bad)
    shared = tmp_path / "shared.json"
    shared.write_text(json.dumps({"m": [{"batch": 1, "cache_frames": 0}]}))
    with pytest.raises(ProfileError, match=r"shared\.json.*m\[0\].*chunk_tokens"):
        load_profiles(shared)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_profiles(tmp_path / "nope.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ProfileError, match="junk.json"):
        load_profiles(tmp_path / "junk.json")


def test_resolve_shape_by_name_and_path(tmp_path):
    model = load_latency_model()
    assert resolve_shape("demo91", model) == "demo91"
    p = model.profile("demo91")
    p2 = type(p)(**{**p.__dict__, "shape": type(p.shape)(**{**p.shape.__dict__, "name": "mine"})})
    save_profile(p2, tmp_path / "mine.json")
    assert resolve_shape(str(tmp_path / "mine.json"), model) == "mine"
    assert "mine" in model.shapes()
    with pytest.raises(ValueError, match="demo91"):
        resolve_shape("no-such-shape", model)
