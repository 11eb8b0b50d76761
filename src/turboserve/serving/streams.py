"""Per-session chunk streams: encoding, a bounded replay buffer, subscribers and recording.

In: chunk deliveries from the runtime (`ChunkDelivery`: uint8 frames (T, H, W, 3) plus
index, latency and worker), on whatever thread the engine runs; session ends.
Out: for each WebSocket subscriber, an ordered walk over the session's chunks from any
`from_chunk` still held in the replay buffer (`SessionStream.chunks(...)` yields them), and
one MP4 file per session under the storage directory.

Why cursors instead of pushing into per-subscriber queues: the producer only appends to
one bounded deque per session (the replay buffer) and wakes waiters; each subscriber keeps
its own cursor into it. A slow subscriber therefore costs the producer nothing and its
backlog is bounded by the replay buffer (it gets a `gap` notice if it falls further behind
than `replay_chunks`), and a reconnecting client resumes from `from_chunk` with no gaps and
no duplicates by construction.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import queue
import threading
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import numpy as np

from ..cluster.runtime import ChunkDelivery

log = logging.getLogger(__name__)


@dataclass
class StreamChunk:
    """One chunk as held in the replay buffer."""

    index: int
    frames: np.ndarray  # uint8 (T, H, W, 3)
    latency_ms: float
    worker: str
    fmp4: bytes  # one moof+mdat media segment
    _jpeg: list[bytes] | None = field(default=None, repr=False)

    @property
    def frame_count(self) -> int:
        return int(self.frames.shape[0])

    def jpeg_frames(self, quality: int = 85) -> list[bytes]:
        """JPEG-encode lazily: only sessions with a jpeg subscriber pay for it."""
        if self._jpeg is None:
            from PIL import Image

            out = []
            for frame in self.frames:
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
                out.append(buf.getvalue())
            self._jpeg = out
        return self._jpeg


@dataclass(frozen=True)
class StreamEnd:
    """The session ended: its final state and how many chunks it produced."""

    state: str
    chunks: int
    reason: str = ""


@dataclass(frozen=True)
class StreamGap:
    """Chunks [first, last] are no longer in the replay buffer and will never be sent."""

    first: int
    last: int


def codec_string(init_segment: bytes) -> str:
    """RFC 6381 codec string (`avc1.PPCCLL`) from the avcC box of an H.264 init segment,
    which Media Source Extensions need in `addSourceBuffer`."""
    at = init_segment.find(b"avcC")
    if at < 0 or at + 8 > len(init_segment):
        return "avc1.42E01E"  # constrained baseline 3.0: a safe default
    profile, compat, level = init_segment[at + 5], init_segment[at + 6], init_segment[at + 7]
    return f"avc1.{profile:02X}{compat:02X}{level:02X}"


class SessionStream:
    """The chunks of one session. Encoding and recording run on the producer's thread;
    the buffer and the waiters live on the event loop."""

    def __init__(self, session_id: str, width: int, height: int, fps: float, *,
                 replay_chunks: int, loop: asyncio.AbstractEventLoop, record_path: Path | None,
                 encoder_factory: Callable[[int, int, float], object]):
        self.session_id = session_id
        self.width, self.height, self.fps = width, height, fps
        self._loop = loop
        self._encoder_factory = encoder_factory
        self._encoder = None  # made on the first chunk: frames tell the true size
        self._encode_lock = threading.Lock()  # chunks may come from two engines around a migration
        self._finished = False  # set by `finish` on the producer side, under the lock
        self.init_segment: bytes | None = None
        self.mime = ""
        self.buffer: deque[StreamChunk] = deque(maxlen=max(1, replay_chunks))
        self.next_index = 0  # index the next published chunk must have
        self.end: StreamEnd | None = None
        self._changed = asyncio.Event()
        self._record_path = record_path
        self._record_file = None
        self.recording: Path | None = None  # the finished MP4, once closed

    # -- producer side (any thread) -------------------------------------------------------
    def on_chunk(self, d: ChunkDelivery) -> None:
        frames = np.ascontiguousarray(d.frames, dtype=np.uint8)
        with self._encode_lock:
            if self._finished:
                return  # a chunk racing the session's end: the stream is closed
            if self._encoder is None:
                self.height, self.width = int(frames.shape[1]), int(frames.shape[2])
                self._encoder = self._encoder_factory(self.width, self.height, self.fps)
                init = self._encoder.init_segment()
                self._loop.call_soon_threadsafe(self._set_init, init)
                self._record(init)
            segment = self._encoder.encode_chunk(frames)
            self._record(segment)
        chunk = StreamChunk(d.chunk_index, frames, d.latency_ms, d.worker, segment)
        self._loop.call_soon_threadsafe(self._publish, chunk)

    def finish(self, state: str, reason: str = "") -> None:
        with self._encode_lock:
            self._finished = True
            self._close_recording()
        self._loop.call_soon_threadsafe(self._end, state, reason)

    def _record(self, data: bytes) -> None:
        if self._record_path is None:
            return
        try:
            if self._record_file is None:
                self._record_path.parent.mkdir(parents=True, exist_ok=True)
                self._record_file = open(self._record_path.with_suffix(".mp4.part"), "wb")
            self._record_file.write(data)
        except OSError as e:  # a full disk loses the recording, never the stream
            log.warning("recording %s failed: %s", self.session_id, e)
            self._record_path = None

    def _close_recording(self) -> None:
        if self._record_file is not None:
            self._record_file.close()
            part = self._record_path.with_suffix(".mp4.part")
            os.replace(part, self._record_path)
            self.recording = self._record_path
            self._record_file = None

    # -- event-loop side ----------------------------------------------------------------
    def _set_init(self, init: bytes) -> None:
        self.init_segment = init
        self.mime = f'video/mp4; codecs="{codec_string(init)}"'
        self._wake()

    def _publish(self, chunk: StreamChunk) -> None:
        if chunk.index < self.next_index:
            log.warning("session %s: duplicate chunk %d dropped", self.session_id, chunk.index)
            return
        if chunk.index > self.next_index:
            log.warning("session %s: chunks %d..%d never arrived", self.session_id,
                        self.next_index, chunk.index - 1)
        self.buffer.append(chunk)
        self.next_index = chunk.index + 1
        self._wake()

    def _end(self, state: str, reason: str) -> None:
        if self.end is None:
            self.end = StreamEnd(state, self.next_index, reason)
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_init(self) -> bytes | None:
        """The init segment, or None if the session ended before its first chunk."""
        while self.init_segment is None and self.end is None:
            await self._changed.wait()
        return self.init_segment

    async def chunks(self, from_chunk: int = 0) -> AsyncIterator[StreamChunk | StreamGap | StreamEnd]:
        """Every chunk from `from_chunk` on, in order, once each; a `StreamGap` for chunks
        the replay buffer no longer holds; finally the `StreamEnd`."""
        cursor = max(0, from_chunk)
        while True:
            first_held = self.buffer[0].index if self.buffer else self.next_index
            if cursor < first_held:
                yield StreamGap(cursor, first_held - 1)
                cursor = first_held
            if cursor < self.next_index:
                chunk = self.buffer[cursor - first_held]
                cursor += 1
                yield chunk
                continue
            if self.end is not None:
                yield self.end
                return
            await self._changed.wait()


class StreamHub:
    """All sessions' streams; the runtime's listeners feed it.

    Encoding runs on a few encoder threads, never on the engine's: a worker's next round
    does not wait for video encoding. A session always maps to the same encoder thread, so
    its chunks (and its end) are handled in order.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, replay_chunks: int = 64,
                 storage_dir: str | Path | None = None, encoder_factory=None, keep_ended: int = 256,
                 encoder_threads: int = 2):
        if encoder_factory is None:
            from ..video import FragmentedMP4Encoder as encoder_factory
        self._loop = loop
        self._replay_chunks = replay_chunks
        self._storage = Path(storage_dir) if storage_dir else None
        self._encoder_factory = encoder_factory
        self._streams: dict[str, SessionStream] = {}
        self._ended: deque[str] = deque()
        self._keep_ended = keep_ended
        self._lock = threading.Lock()
        self._queues = [queue.SimpleQueue() for _ in range(max(1, encoder_threads))]
        self._threads = [threading.Thread(target=self._encode_loop, args=(q,), name=f"encoder-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()

    def open(self, session_id: str, width: int, height: int, fps: float) -> SessionStream:
        with self._lock:
            stream = self._streams.get(session_id)
            if stream is None:
                record = self._storage / f"{session_id}.mp4" if self._storage else None
                stream = SessionStream(session_id, width, height, fps,
                                       replay_chunks=self._replay_chunks, loop=self._loop,
                                       record_path=record, encoder_factory=self._encoder_factory)
                self._streams[session_id] = stream
            return stream

    def get(self, session_id: str) -> SessionStream | None:
        return self._streams.get(session_id)

    def _queue_of(self, session_id: str) -> "queue.SimpleQueue":
        return self._queues[zlib.crc32(session_id.encode()) % len(self._queues)]

    def on_chunk(self, d: ChunkDelivery) -> None:
        """Runtime listener (engine thread): hand the chunk to its encoder thread."""
        stream = self._streams.get(d.session_id)
        if stream is None:
            log.warning("chunk for unknown session %s dropped", d.session_id)
            return
        self._queue_of(d.session_id).put((stream, d))

    def on_end(self, session_id: str, state: str, reason: str = "") -> None:
        """Runtime listener: the session ended; its stream ends after its last chunk."""
        stream = self._streams.get(session_id)
        if stream is not None:
            self._queue_of(session_id).put((stream, StreamEnd(state, 0, reason)))

    def _encode_loop(self, q: "queue.SimpleQueue") -> None:
        while True:
            item = q.get()
            if item is None:
                return
            stream, what = item
            try:
                if isinstance(what, StreamEnd):
                    stream.finish(what.state, what.reason)
                    self._retire(stream.session_id)
                else:
                    stream.on_chunk(what)
            except Exception:  # one session's encoding failure must not stop the others
                log.exception("session %s: stream update failed", stream.session_id)

    def _retire(self, session_id: str) -> None:
        # Ended streams stay for late readers, but only the most recent ones: memory stays
        # bounded on a server that runs for weeks.
        with self._lock:
            self._ended.append(session_id)
            while len(self._ended) > self._keep_ended:
                self._streams.pop(self._ended.popleft(), None)

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._streams.pop(session_id, None)

    def close(self) -> None:
        """Stop the encoder threads after what is queued (server shutdown)."""
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join(10.0)
