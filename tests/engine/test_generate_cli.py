"""`turboserve generate` end to end on CPU with `tiny`: one playable MP4 per prompt."""

from __future__ import annotations

import av
import pytest
import torch

from turboserve.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core CI box: see test_torch_executor.py
    yield
    torch.set_num_threads(before)


def test_generate_writes_one_playable_mp4_per_prompt(tmp_path, capsys):
    out = tmp_path / "videos"
    code = main(["generate", "--model", "tiny", "--prompt", "a red kite", "--prompt", "a city at night",
                 "--chunks", "3", "--out", str(out), "--device", "cpu"])
    assert code == 0
    files = sorted(out.glob("*.mp4"))
    assert [f.name for f in files] == ["00-a-red-kite.mp4", "01-a-city-at-night.mp4"]
    decoded = []
    for f in files:
        with av.open(str(f)) as c:
            stream = c.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = [fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]
        assert len(frames) == 3 * 4, "3 chunks of 4 frames"
        assert frames[0].shape == (64, 64, 3)
        decoded.append(frames)
    assert any(abs(a.astype(int) - b).mean() > 5 for a, b in zip(decoded[0], decoded[1])), \
        "two prompts (and seeds) must give two different videos"
    summary = capsys.readouterr().out
    assert "generated 6 chunks (24 frames, 2 videos)" in summary and "chunk latency" in summary


def test_engine_dtype_reaches_the_model(tmp_path, capsys):
    """`engine.dtype` is the model's dtype (it was read nowhere); "auto" is float32 on CPU."""
    for dtype in ("bfloat16", "auto"):
        assert main(["generate", "--model", "tiny", "--prompt", "x", "--chunks", "1", "--out", str(tmp_path / dtype),
                     "--device", "cpu", "--set", f"engine.dtype={dtype}"]) == 0
        want = "bfloat16" if dtype == "bfloat16" else "float32"
        assert f"on cpu ({want})" in capsys.readouterr().out


def test_generate_rejects_bad_arguments(tmp_path, capsys):
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--chunks", "0", "--out", str(tmp_path)]) == 2
    assert "--chunks must be >= 1" in capsys.readouterr().err
    assert main(["generate", "--model", "nope", "--prompt", "x", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
