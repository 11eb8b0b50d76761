"""H.264 video encoding: whole MP4 files and fragmented MP4 for live streaming.

In: RGB frames, uint8 arrays or tensors shaped (H, W, 3) or (T, H, W, 3).
Out: `write_mp4` / `Mp4Writer` write one H.264/yuv420p MP4 file; `FragmentedMP4Encoder` turns each
chunk of frames into one self-contained media segment (moof+mdat starting on a keyframe)
after a shared init segment (ftyp+moov), the byte layout Media Source Extensions play:
`init_segment() + encode_chunk(c0) + encode_chunk(c1) + ...` is a valid fragmented MP4.

yuv420p needs even width and height, so odd sizes are padded by repeating the last
row/column (never cropped: no pixel the model produced is lost).
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

_CODEC = "libx264"
# Each media segment must start with a keyframe and must not wait for later frames:
# no B-frames, no lookahead (zerolatency), so every frame comes out as soon as it goes in.
_X264_OPTIONS = {"preset": "veryfast", "tune": "zerolatency", "crf": "23"}
_FRAGMENT_FLAGS = "frag_keyframe+empty_moov+default_base_moof"


def _as_frames(frames: Any) -> np.ndarray:
    """(T, H, W, 3) or (H, W, 3), numpy or torch, -> contiguous uint8 (T, H, W, 3)."""
    if hasattr(frames, "detach"):  # a torch tensor, without importing torch here
        frames = frames.detach().cpu().numpy()
    arr = np.asarray(frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be shaped (T, H, W, 3) or (H, W, 3) RGB, got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (0..255), got {arr.dtype}")
    return arr


def _pad_even(arr: np.ndarray) -> np.ndarray:
    """Pad (T, H, W, 3) to even H and W by repeating the last row/column (yuv420p needs it)."""
    pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(arr)


def _fps_fraction(fps: float) -> Fraction:
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    return Fraction(fps).limit_denominator(1001)


def _add_video_stream(container, width: int, height: int, fps: Fraction):
    stream = container.add_stream(_CODEC, rate=fps, options=dict(_X264_OPTIONS))
    stream.width = width
    stream.height = height
    stream.pix_fmt = "yuv420p"
    stream.time_base = 1 / fps  # one tick per frame: pts = frame index
    return stream


def _encode_into(container, stream, arr: np.ndarray, first_pts: int, fps: Fraction) -> int:
    import av

    for i, rgb in enumerate(arr):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = first_pts + i
        # In frame units, not the stream's: the muxer changes the stream's time base when
        # it writes the header (e.g. to 1/16384), the encoder keeps 1/fps.
        frame.time_base = 1 / fps
        container.mux(stream.encode(frame))
    return len(arr)


class Mp4Writer:
    """Writes an H.264 MP4 file chunk by chunk (`write(frames)` as chunks arrive, then
    `close()`), so a recording never holds the whole video in memory. The size is fixed by
    the first chunk. Usable as a context manager."""

    def __init__(self, path: str | Path, fps: float):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rate = _fps_fraction(fps)
        self._container = av.open(str(self.path), mode="w", format="mp4")
        self._stream = None
        self._size: tuple[int, int] | None = None
        self.frames_written = 0

    def write(self, frames: Any) -> None:
        arr = _as_frames(frames)
        if self._size is None:
            self._size = arr.shape[1:3]
            padded = _pad_even(arr)
            self._stream = _add_video_stream(self._container, padded.shape[2], padded.shape[1], self._rate)
        elif arr.shape[1:3] != self._size:
            raise ValueError(f"frame size changed from {self._size} to {arr.shape[1:3]} in {self.path}")
        self.frames_written += _encode_into(self._container, self._stream, _pad_even(arr),
                                            self.frames_written, self._rate)

    def close(self) -> int:
        """Finish the file; returns the frames written. Raises ValueError if there were none."""
        if self._container is None:
            return self.frames_written
        try:
            if self._stream is not None:
                self._container.mux(self._stream.encode(None))  # drain the encoder
        finally:
            self._container.close()
            self._container = None
        if self._stream is None:
            self.path.unlink(missing_ok=True)
            raise ValueError(f"no frames to write to {self.path}")
        return self.frames_written

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._container is not None:
            self._container.close()
            self._container = None


def write_mp4(frames_iter: Iterable[Any], path: str | Path, fps: float) -> int:
    """Write frames (an iterable of (T,H,W,3) or (H,W,3) uint8 chunks) as an H.264 MP4.

    Returns the number of frames written. Raises ValueError on no frames or a size change.
    """
    writer = Mp4Writer(path, fps)
    with writer:
        for chunk in frames_iter:
            writer.write(chunk)
    return writer.frames_written


def _boxes(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """Top-level ISO-BMFF boxes of `data` as (type, start, end) byte offsets."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:  # 64-bit largesize
            size = struct.unpack_from(">Q", data, pos + 8)[0]
            header = 16
        elif size == 0:  # box runs to the end
            size = len(data) - pos
        if size < header:
            raise ValueError(f"corrupt MP4 box {kind!r} at byte {pos}")
        yield kind, pos, pos + size
        pos += size


def _find_box(data: bytearray, start: int, end: int, path: list[bytes]) -> tuple[int, int] | None:
    """Offsets of the first box along `path` (e.g. [b'traf', b'tfdt']) inside data[start:end]."""
    for kind, b_start, b_end in _boxes(bytes(data[start:end])):
        if kind == path[0]:
            if len(path) == 1:
                return start + b_start, start + b_end
            return _find_box(data, start + b_start + 8, start + b_end, path[1:])
    return None


class FragmentedMP4Encoder:
    """Encodes a live stream chunk by chunk as fragmented MP4 (H.264, yuv420p).

    `init_segment()` once, then `encode_chunk(frames)` per chunk: each returns one moof+mdat
    media segment that starts with a keyframe, so a client can join at any chunk boundary
    after the init segment. Every chunk is encoded by a fresh encoder and muxer that is
    closed at the chunk's end: closing is the only way PyAV lets us flush a fragment now
    rather than when the next chunk arrives. The segment's sequence number and decode time
    are then rewritten to continue the stream. Encoder settings are fixed, so every chunk
    shares the init segment's decoder configuration (SPS/PPS).
    """

    def __init__(self, width: int, height: int, fps: float):
        if width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive, got {width}x{height}")
        self.width, self.height = int(width), int(height)
        self.fps = _fps_fraction(fps)
        self.frames_encoded = 0  # frames in all segments so far
        self._sequence = 0  # mfhd sequence number of the last segment
        self._init: bytes | None = None
        self._timescale: int | None = None  # ticks per second of the track (mdhd)

    @property
    def mime_type(self) -> str:
        """The type string for `MediaSource.addSourceBuffer`, e.g. 'video/mp4; codecs="avc1.42c00d"'."""
        init = self.init_segment()
        pos = init.find(b"avcC")
        if pos < 0:
            return 'video/mp4; codecs="avc1.42E01E"'
        profile, compat, level = init[pos + 5], init[pos + 6], init[pos + 7]
        return f'video/mp4; codecs="avc1.{profile:02x}{compat:02x}{level:02x}"'

    def init_segment(self) -> bytes:
        """ftyp+moov: the decoder configuration every media segment needs first."""
        if self._init is None:
            blank = np.zeros((1, self.height, self.width, 3), dtype=np.uint8)
            self._init, _ = self._mux_chunk(blank, first_frame=0)
        return self._init

    def encode_chunk(self, frames: Any) -> bytes:
        """One media segment (moof+mdat, keyframe first) for this chunk's frames."""
        arr = _as_frames(frames)
        if arr.shape[1:3] != (self.height, self.width):
            raise ValueError(
                f"chunk frames are {arr.shape[2]}x{arr.shape[1]} (WxH), encoder expects {self.width}x{self.height}"
            )
        self.init_segment()
        _, segment = self._mux_chunk(arr, first_frame=self.frames_encoded)
        self._sequence += 1
        segment = self._restamp(segment, self._sequence, self.frames_encoded)
        self.frames_encoded += len(arr)
        return segment

    def _mux_chunk(self, arr: np.ndarray, first_frame: int) -> tuple[bytes, bytes]:
        """Encode frames into a closed fragmented MP4; returns (ftyp+moov, moof+mdat...)."""
        import av

        buf = io.BytesIO()
        container = av.open(buf, mode="w", format="mp4", options={"movflags": _FRAGMENT_FLAGS})
        try:
            padded = _pad_even(arr)
            stream = _add_video_stream(container, padded.shape[2], padded.shape[1], self.fps)
            _encode_into(container, stream, padded, 0, self.fps)
            container.mux(stream.encode(None))
        finally:
            container.close()
        data = buf.getvalue()
        head, media = bytearray(), bytearray()
        for kind, start, end in _boxes(data):
            if kind in (b"ftyp", b"moov"):
                head += data[start:end]
            elif kind in (b"moof", b"mdat"):
                media += data[start:end]
            # mfra (random-access index of this one file) is dropped: it would be wrong mid-stream
        if self._timescale is None:
            found = _find_box(bytearray(head), 0, len(head), [b"moov", b"trak", b"mdia", b"mdhd"])
            if found is None:
                raise RuntimeError("muxer wrote no mdhd box; cannot time media segments")
            box = head[found[0]: found[1]]
            version = box[8]
            # mdhd: header(8) version/flags(4) creation, modification (4 or 8 each) timescale(4)
            offset = 12 + (16 if version == 1 else 8)
            self._timescale = struct.unpack_from(">I", box, offset)[0]
        return bytes(head), bytes(media)

    def _restamp(self, segment: bytes, sequence: int, first_frame: int) -> bytes:
        """Set every moof's sequence number and decode time so segments continue the stream."""
        out = bytearray(segment)
        ticks_per_frame = self._timescale / self.fps
        frames_before = 0
        for kind, start, end in list(_boxes(bytes(out))):
            if kind != b"moof":
                continue
            mfhd = _find_box(out, start + 8, end, [b"mfhd"])
            if mfhd is not None:
                struct.pack_into(">I", out, mfhd[0] + 12, sequence)
            tfdt = _find_box(out, start + 8, end, [b"traf", b"tfdt"])
            if tfdt is not None:
                version = out[tfdt[0] + 8]
                base = int(round((first_frame + frames_before) * ticks_per_frame))
                if version == 1:
                    struct.pack_into(">Q", out, tfdt[0] + 12, base)
                else:
                    struct.pack_into(">I", out, tfdt[0] + 12, base & 0xFFFFFFFF)
            trun = _find_box(out, start + 8, end, [b"traf", b"trun"])
            if trun is not None:
                frames_before += struct.unpack_from(">I", out, trun[0] + 12)[0]
        return bytes(out)
