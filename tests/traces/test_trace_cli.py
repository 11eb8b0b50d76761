"""`turboserve trace synth | convert | stats` end to end through the real argument parser,
and the shipped example trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from turboserve.cli import main
from turboserve.profile import load_latency_model
from turboserve.traces.rescale import peak_demand
from turboserve.traces.schema import read_trace

REPO = Path(__file__).resolve().parents[2]
SHARED = next((p for p in (REPO.parent / "shared" / "traces", Path("/work/shared/traces")) if p.is_dir()), None)
MODEL = load_latency_model()


def test_synth_fit_and_stats(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert main(["trace", "synth", "--out", str(out), "--hours", "0.5", "--seed", "7", "--fit-gpus", "4"]) == 0
    records = read_trace(out)
    assert {r.spec.model for r in records} == {"demo91"}  # --model defaults to demo91 with --fit-gpus
    peak, _ = peak_demand(records, MODEL, "demo91")
    assert 3 < peak <= 4 + 1e-9
    capsys.readouterr()
    assert main(["trace", "stats", str(out), "--model", "demo91"]) == 0
    text = capsys.readouterr().out
    assert "peak_concurrent_active" in text and "peak_gpus                4" in text
    # same seed, same file
    out2 = tmp_path / "t2.jsonl"
    assert main(["trace", "synth", "--out", str(out2), "--hours", "0.5", "--seed", "7", "--fit-gpus", "4"]) == 0
    assert out.read_bytes() == out2.read_bytes()


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["trace", "stats", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["trace", "synth", "--out", str(tmp_path / "x.jsonl"), "--model", "nope"]) == 2
    assert "known shapes" in capsys.readouterr().err
    assert main(["trace", "synth", "--out", str(tmp_path / "x.jsonl"), "--fit-gpus", "2", "--model", "wan14b-480p"]) == 2
    assert "slo" in capsys.readouterr().err.lower()


def test_stats_and_fitting_count_the_configured_gpu_memory(tmp_path, capsys):
    """wan1.3b-320p fits two sessions per 80 GB GPU within its playback time; on a 7 GB GPU
    memory holds one, so the same trace needs twice the GPUs (as `simulate` runs it)."""
    trace = str(REPO / "examples" / "bursty-1h.jsonl")
    peaks = []
    for extra in ([], ["--set", "cluster.gpu_memory_bytes=7000000000"]):
        assert main(["trace", "stats", trace, "--model", "wan1.3b-320p", *extra]) == 0
        peaks.append(next(int(line.split()[1]) for line in capsys.readouterr().out.splitlines()
                          if line.startswith("peak_gpus ")))
    assert peaks[1] == 2 * peaks[0]
    out = tmp_path / "fit.jsonl"
    assert main(["trace", "synth", "--out", str(out), "--hours", "0.2", "--fit-gpus", "4", "--model",
                 "wan1.3b-320p", "--set", "cluster.gpu_memory_bytes=7000000000"]) == 0
    peak, _ = peak_demand(read_trace(out), MODEL.on_gpu(7 * 10**9), "wan1.3b-320p")
    assert 3 < peak <= 4 + 1e-9


def test_directories_as_inputs(tmp_path, capsys):
    """A directory stands for its files of the format; a directory without any, a missing
    input and a directory given as a trace are clear errors."""
    d = tmp_path / "azure"
    d.mkdir()
    for part, t0 in ((2, 0), (10, 60)):
        rows = [f"2023-11-16 18:{t0 // 60 + i:02d}:00.0,{200 + i},{150 + i}" for i in range(10)]
        (d / f"part-{part}.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    (d / "notes.txt").write_text("not a trace")
    out = tmp_path / "dir.jsonl"
    assert main(["trace", "convert", "--format", "azure", "--out", str(out), str(d)]) == 0
    both = tmp_path / "files.jsonl"
    assert main(["trace", "convert", "--format", "azure", "--out", str(both),
                 str(d / "part-2.csv"), str(d / "part-10.csv")]) == 0
    assert out.read_bytes() == both.read_bytes() and len(read_trace(out)) > 0
    capsys.readouterr()
    assert main(["trace", "convert", "--format", "mooncake", "--out", str(out), str(d)]) == 2
    assert "no Mooncake trace file (*.jsonl)" in capsys.readouterr().err
    assert main(["trace", "convert", "--format", "azure", "--out", str(out), str(tmp_path / "gone")]) == 2
    assert "gone does not exist" in capsys.readouterr().err
    assert main(["trace", "stats", str(d)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.skipif(SHARED is None, reason="../shared/traces not present")
def test_convert_formats(tmp_path):
    for fmt, src in (("mooncake", SHARED / "mooncake-conversation.jsonl"), ("azure", SHARED / "azure-llm-2023-conv.csv"),
                     ("servegen", SHARED / "servegen-m-small")):
        out = tmp_path / f"{fmt}.jsonl"
        assert main(["trace", "convert", "--format", fmt, "--hours", "0.2", "--out", str(out), str(src)]) == 0, fmt
        records = read_trace(out)
        assert records and all(r.arrival_s < 0.2 * 3600 for r in records), fmt
    out = tmp_path / "fit.jsonl"
    assert main(["trace", "convert", "--format", "azure", "--hours", "0.2", "--fit-gpus", "3", "--model", "wan1.3b-320p",
                 "--set", "slo.slo_ms=1500", "--out", str(out), str(SHARED / "azure-llm-2023-conv.csv")]) == 0
    records = read_trace(out)
    assert {r.spec.frames_per_chunk for r in records} == {12}
    peak, _ = peak_demand(records, MODEL, "wan1.3b-320p", slo_ms=1500)
    assert 2 < peak <= 3 + 1e-9


def test_shipped_example_is_fitted_to_8_gpus():
    records = read_trace(REPO / "examples" / "bursty-1h.jsonl")
    peak, _ = peak_demand(records, MODEL, "demo91")
    assert 7 < peak <= 8 + 1e-9
    assert 45 * 60 < max(r.arrival_s for r in records) < 75 * 60
    assert (REPO / "examples" / "bursty-1h.jsonl").stat().st_size < 800_000
