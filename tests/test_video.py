"""H.264 encoding: whole files and fragmented MP4 segments decode back to what went in."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest

from turboserve.video import FragmentedMP4Encoder, Mp4Writer, write_mp4


def _chunks(n_chunks: int, frames: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    # Smooth gradients that move per frame: content an encoder handles like real video.
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    out = []
    for c in range(n_chunks):
        chunk = np.empty((frames, height, width, 3), dtype=np.uint8)
        for t in range(frames):
            k = c * frames + t
            for ch in range(3):
                chunk[t, :, :, ch] = (xs * 4 + ys * 2 + k * 9 + ch * 60 + rng.integers(0, 3)) % 256
        out.append(chunk)
    return out


def _decode(data_or_path) -> list[av.VideoFrame]:
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else str(data_or_path)
    with av.open(src) as c:
        return list(c.decode(video=0))


def _top_boxes(data: bytes) -> list[bytes]:
    kinds, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        kinds.append(kind)
        pos += size
    assert pos == len(data), "boxes must tile the segment exactly"
    return kinds


def test_write_mp4_frame_count_size_and_content(tmp_path):
    chunks = _chunks(3, 4, 64, 64)
    path = tmp_path / "v.mp4"
    assert write_mp4(iter(chunks), path, fps=16) == 12
    frames = _decode(path)
    assert len(frames) == 12
    assert (frames[0].width, frames[0].height) == (64, 64)
    assert frames[0].format.name == "yuv420p"
    # Lossy, but a smooth picture survives: mean error of a few levels, not noise.
    err = np.abs(frames[5].to_ndarray(format="rgb24").astype(int) - chunks[1][1].astype(int)).mean()
    assert err < 12, err


def test_write_mp4_pads_odd_sizes_and_rejects_bad_input(tmp_path):
    path = tmp_path / "odd.mp4"
    assert write_mp4([np.zeros((2, 17, 33, 3), np.uint8)], path, fps=8) == 2
    frames = _decode(path)
    assert len(frames) == 2 and (frames[0].width, frames[0].height) == (34, 18)
    with pytest.raises(ValueError, match="no frames"):
        write_mp4([], tmp_path / "empty.mp4", fps=16)
    with pytest.raises(ValueError, match="uint8"):
        write_mp4([np.zeros((1, 8, 8, 3), np.float32)], tmp_path / "f.mp4", fps=16)
    with pytest.raises(ValueError, match="size changed"):
        write_mp4([np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 10, 3), np.uint8)], tmp_path / "s.mp4", fps=16)
    with pytest.raises(ValueError, match="fps"):
        Mp4Writer(tmp_path / "z.mp4", fps=0)


def test_fragmented_segments_concatenate_to_a_playable_stream():
    enc = FragmentedMP4Encoder(width=48, height=32, fps=16)
    init = enc.init_segment()
    assert _top_boxes(init) == [b"ftyp", b"moov"]
    assert b"mvex" in init, "a fragmented stream's moov announces movie fragments"
    chunks = _chunks(5, 4, 32, 48)
    segments = [enc.encode_chunk(c) for c in chunks]
    for seg in segments:
        assert _top_boxes(seg) == [b"moof", b"mdat"], "one media segment per chunk"
    frames = _decode(init + b"".join(segments))
    assert len(frames) == 20
    assert (frames[0].width, frames[0].height) == (48, 32)
    # Each chunk starts on a keyframe, so a client may join at any segment boundary.
    assert [f.key_frame for f in frames][::4] == [True] * 5
    # Timestamps continue across segments (what MSE appends need).
    pts = [f.pts for f in frames]
    assert pts == sorted(pts) and len(set(pts)) == 20
    assert float(frames[-1].time) == pytest.approx(19 / 16, abs=1e-3)
    # Joining late: init + the last two segments still decode (8 frames).
    assert len(_decode(init + segments[3] + segments[4])) == 8
    assert enc.mime_type.startswith('video/mp4; codecs="avc1.')


def test_fragmented_encoder_checks_frame_size():
    enc = FragmentedMP4Encoder(width=16, height=16, fps=16)
    with pytest.raises(ValueError, match="16x16"):
        enc.encode_chunk(np.zeros((4, 8, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="positive"):
        FragmentedMP4Encoder(width=0, height=16, fps=16)
