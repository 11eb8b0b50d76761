"""bench/_args.py: a typo in a benchmark's list arguments is a usage error (exit 2) that
names the flag and what it takes, before anything runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import decision_time  # noqa: E402
import sim_speed  # noqa: E402
from _args import int_list, name_list  # noqa: E402


def _usage_error(capsys, fn, *args) -> str:
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_lists_parse_and_refuse(capsys):
    ap = argparse.ArgumentParser(prog="b")
    assert int_list(ap, "--gpus", "4,16", least=1) == [4, 16]
    assert int_list(ap, "--steps", "", empty_ok=True) == []
    assert "got none" in _usage_error(capsys, int_list, ap, "--seeds", " ")
    assert name_list(ap, "--traces", "a,b", ["a", "b", "c"]) == ["a", "b"]
    assert "--gpus takes integers" in _usage_error(capsys, int_list, ap, "--gpus", "4,x")
    assert "at least 1" in _usage_error(capsys, int_list, ap, "--gpus", "0", 1)
    assert "some of a, b" in _usage_error(capsys, name_list, ap, "--traces", "a,z", ["a", "b"])
    assert "some of a" in _usage_error(capsys, name_list, ap, "--traces", "", ["a"])


@pytest.mark.parametrize("main, argv, says", [
    (decision_time.main, ["--gpus", "4,x"], "--gpus"),
    (decision_time.main, ["--policy", "turbo"], "turboserve-no-offload"),
    (decision_time.main, ["--steps", "2,a"], "--steps"),
    (sim_speed.main, ["--shapes", "demo"], "wan14b-480p"),
    (sim_speed.main, ["--traces", "moon"], "synthetic-mixed"),
    (sim_speed.main, ["--gpus", "0"], "at least 1"),
])
def test_benchmarks_refuse_a_typo_before_running(capsys, tmp_path, main, argv, says):
    assert says in _usage_error(capsys, main, argv + ["--json", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
