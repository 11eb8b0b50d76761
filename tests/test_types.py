"""Core types: a CompatKey is one object per key (policies' dicts match on identity) and
behaves as a value everywhere else: equal, hashed, ordered and pickled by its fields."""

from __future__ import annotations

import pickle
import subprocess
import sys

from turboserve.types import CompatKey, SessionSpec


def test_equal_specs_share_one_compat_key():
    a = SessionSpec(model="demo91", seed=1)
    b = SessionSpec(model="demo91", seed=2)
    assert a.compat_key is b.compat_key
    assert SessionSpec(model="demo91", steps=2).compat_key != a.compat_key


def test_a_compat_key_is_a_value():
    k = SessionSpec(model="demo91").compat_key
    twin = CompatKey(k.model, k.width, k.height, k.frames_per_chunk, k.steps)
    assert twin is not k and twin == k and hash(twin) == hash(k) and len({k, twin}) == 1
    assert k != (k.model, k.width, k.height, k.frames_per_chunk, k.steps)
    assert CompatKey("a", 1, 1, 1, 1) < CompatKey("b", 1, 1, 1, 1)
    back = pickle.loads(pickle.dumps(k))
    assert back == k and hash(back) == hash(k)


def test_a_pickled_key_hashes_afresh_in_another_process():
    """String hashes differ between processes: a key sent to a worker process (Ray) must
    not carry the sender's hash."""
    k = SessionSpec(model="demo91").compat_key
    hash(k)
    blob = pickle.dumps(k)
    code = ("import pickle, sys; from turboserve.types import CompatKey; "
            "k = pickle.loads(sys.stdin.buffer.read()); "
            "t = CompatKey(k.model, k.width, k.height, k.frames_per_chunk, k.steps); "
            "print({t: 1}.get(k))")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == b"1"
