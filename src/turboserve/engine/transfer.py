"""Moving a session's state (a `SessionBlob` with a `StreamState` payload) between engines.

In: a blob exported by `TorchExecutor.export_state`. Out: an equivalent blob whose tensors
live where the destination wants them, or, across processes, the same blob rebuilt on the
receiving rank.

- `device_copy(blob, device)`: in-process copy (GPU->GPU over NVLink/PCIe, or CPU->CPU);
  `handoff(blob)`: zero-copy adoption between engines that share a device.
  `DeviceTransfer(device)` picks between them as the `transfer(blob) -> blob` function the
  migration state machine plugs in.
- `send_blob` / `recv_blob`: across processes with `torch.distributed` point-to-point
  (NCCL between GPUs, gloo on CPU). The wire format streams: a fixed 8-byte length, a JSON
  header (ids, spec, prompt, counters, and each tensor's name/shape/dtype), then every
  tensor's bytes in pieces of at most `piece_bytes`, received straight into the destination
  tensor. So a multi-gigabyte KV cache never needs a second full-size staging buffer, and
  the receiver allocates exactly once. The receiver answers with a one-byte status
  (`recv_blob(..., ack=True)` / `send_blob(..., wait_ack=True)`), so the sender learns
  whether the destination took the session before it lets go of its own copy.

Any failure raises `TransferError`: the migration state machine then aborts and the
session stays intact on its source (the source's tensors are only ever read here).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..models.base import StreamState
from ..types import SessionSpec
from .executor import SessionBlob

DEFAULT_PIECE_BYTES = 64 * 1024 * 1024  # bounded staging per message; large states stream
_PROTOCOL = "turboserve-blob/1"
ACK_OK, ACK_FAILED = 1, 0


class TransferError(RuntimeError):
    """A state transfer failed; the source still holds the session."""


# --------------------------------------------------------------------------- in-process copy
def device_copy(blob: SessionBlob, device: str | torch.device) -> SessionBlob:
    """A new blob whose state tensors are fresh copies on `device` (never aliases the source)."""
    state = _payload(blob)
    dst = torch.device(device)
    try:
        tensors = {}
        for name, t in state.tensors.items():
            out = torch.empty(t.shape, dtype=t.dtype, device=dst)
            out.copy_(t, non_blocking=t.is_cuda and dst.type == "cuda")
            tensors[name] = out
        if dst.type == "cuda":
            torch.cuda.synchronize(dst)
    except Exception as exc:  # noqa: BLE001 - out of memory, device lost, ...
        raise TransferError(f"copying session {blob.session_id!r} to {dst} failed: {exc}") from exc
    return _with_tensors(blob, state, tensors)


def handoff(blob: SessionBlob) -> SessionBlob:
    """Zero-copy move between engines on the same device: the destination adopts the
    source's tensors. Safe because the source holds the session (no chunk writes them) from
    export until it drops the session at commit, and on an abort the destination never
    imported them."""
    state = _payload(blob)
    return _with_tensors(blob, state, dict(state.tensors))


@dataclass
class DeviceTransfer:
    """`transfer(blob) -> blob` for the migration state machine: the state onto `device`.

    Tensors already on `device` are handed off without a copy (two engines sharing one
    device: the CPU engines of the embedded server, or two engines on one GPU) unless
    `always_copy`; anything elsewhere is copied (GPU to GPU over NVLink/PCIe)."""

    device: str | torch.device
    always_copy: bool = False
    last_duration_ms: float = 0.0
    last_nbytes: int = 0
    last_copied: bool = False

    def __call__(self, blob: SessionBlob) -> SessionBlob:
        start = time.perf_counter()
        dst = torch.device(self.device)
        state = _payload(blob)
        local = all(_same_device(t.device, dst) for t in state.tensors.values())
        self.last_copied = self.always_copy or not local
        out = device_copy(blob, dst) if self.last_copied else handoff(blob)
        self.last_duration_ms = (time.perf_counter() - start) * 1000.0
        self.last_nbytes = out.nbytes
        return out


# ------------------------------------------------------------------------ across processes
def wire_device(group: Any = None) -> torch.device:
    """Where point-to-point buffers must live for this process group's backend."""
    import torch.distributed as dist

    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def send_blob(blob: SessionBlob, dst_rank: int, *, group: Any = None,
              piece_bytes: int = DEFAULT_PIECE_BYTES, wait_ack: bool = True) -> int:
    """Stream `blob` to `dst_rank`; returns the payload bytes sent. With `wait_ack`, waits for
    the receiver's status and raises `TransferError` if it could not take the session."""
    import torch.distributed as dist

    if piece_bytes <= 0:
        raise ValueError(f"piece_bytes must be positive, got {piece_bytes}")
    state = _payload(blob)
    wire = wire_device(group)
    try:
        header = _encode_header(blob, state)
        dist.send(torch.tensor([len(header)], dtype=torch.int64, device=wire), dst_rank, group=group)
        dist.send(torch.frombuffer(bytearray(header), dtype=torch.uint8).to(wire), dst_rank, group=group)
        sent = 0
        for t in state.tensors.values():
            flat = _as_bytes(t.contiguous())
            for start in range(0, flat.numel(), piece_bytes):
                piece = flat[start: start + piece_bytes]
                if piece.device != wire:
                    piece = piece.to(wire)
                dist.send(piece, dst_rank, group=group)
                sent += piece.numel()
        if wait_ack:
            status = torch.zeros(1, dtype=torch.uint8, device=wire)
            dist.recv(status, dst_rank, group=group)
            if int(status.item()) != ACK_OK:
                raise TransferError(f"rank {dst_rank} refused session {blob.session_id!r}")
    except TransferError:
        raise
    except Exception as exc:  # noqa: BLE001 - peer gone, timeout, backend error
        raise TransferError(f"sending session {blob.session_id!r} to rank {dst_rank} failed: {exc}") from exc
    return sent


def recv_blob(src_rank: int, device: str | torch.device = "cpu", *, group: Any = None,
              piece_bytes: int = DEFAULT_PIECE_BYTES) -> SessionBlob:
    """Receive one blob streamed by `send_blob`, its tensors allocated on `device`.

    If the sender waits for an acknowledgement, call `ack(src_rank, ok)` once the session
    has been imported (or refused)."""
    import torch.distributed as dist

    wire = wire_device(group)
    dst = torch.device(device)
    try:
        length = torch.zeros(1, dtype=torch.int64, device=wire)
        dist.recv(length, src_rank, group=group)
        raw = torch.empty(int(length.item()), dtype=torch.uint8, device=wire)
        dist.recv(raw, src_rank, group=group)
        header = json.loads(bytes(raw.cpu().numpy()).decode("utf-8"))
        if header.get("protocol") != _PROTOCOL:
            raise TransferError(f"unexpected transfer protocol {header.get('protocol')!r}")
        tensors: dict[str, torch.Tensor] = {}
        for name, shape, dtype_name in header["tensors"]:
            t = torch.empty(shape, dtype=_dtype(dtype_name), device=dst)
            flat = _as_bytes(t)
            for start in range(0, flat.numel(), piece_bytes):
                piece = flat[start: start + piece_bytes]
                if piece.device == wire:
                    dist.recv(piece, src_rank, group=group)  # straight into the destination
                else:
                    staged = torch.empty(piece.numel(), dtype=torch.uint8, device=wire)
                    dist.recv(staged, src_rank, group=group)
                    piece.copy_(staged)
            tensors[name] = t
    except TransferError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TransferError(f"receiving a session from rank {src_rank} failed: {exc}") from exc
    spec = SessionSpec.from_dict(header["spec"])
    state = StreamState(session_id=header["state_session_id"], spec=spec, prompt=header["prompt"],
                        chunk_index=header["state_chunk_index"], tensors=tensors, meta=header["meta"])
    return SessionBlob(session_id=header["session_id"], spec=spec, prompt=header["prompt"],
                       chunk_index=header["chunk_index"], nbytes=state.nbytes(), payload=state)


def ack(src_rank: int, ok: bool, *, group: Any = None) -> None:
    """Tell the sender whether the received session was taken (see `send_blob(wait_ack=True)`)."""
    import torch.distributed as dist

    status = torch.tensor([ACK_OK if ok else ACK_FAILED], dtype=torch.uint8, device=wire_device(group))
    dist.send(status, src_rank, group=group)


@dataclass
class DistributedSendTransfer:
    """`transfer(blob) -> blob` for the migration state machine on the *source* process:
    streams the state to `dst_rank` and returns a payload-less receipt once the destination
    acknowledged the import. Raises `TransferError` otherwise (the migration aborts)."""

    dst_rank: int
    group: Any = None
    piece_bytes: int = DEFAULT_PIECE_BYTES
    last_duration_ms: float = 0.0
    last_nbytes: int = 0

    def __call__(self, blob: SessionBlob) -> SessionBlob:
        start = time.perf_counter()
        self.last_nbytes = send_blob(blob, self.dst_rank, group=self.group, piece_bytes=self.piece_bytes)
        self.last_duration_ms = (time.perf_counter() - start) * 1000.0
        return SessionBlob(blob.session_id, blob.spec, blob.prompt, blob.chunk_index, blob.nbytes, None)


# ---------------------------------------------------------------------------------- helpers
def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def _payload(blob: SessionBlob) -> StreamState:
    if not isinstance(blob.payload, StreamState):
        raise TransferError(
            f"blob of session {blob.session_id!r} has no StreamState payload "
            f"({type(blob.payload).__name__}); only torch executors' blobs carry tensors"
        )
    return blob.payload


def _with_tensors(blob: SessionBlob, state: StreamState, tensors: dict[str, torch.Tensor]) -> SessionBlob:
    new_state = StreamState(session_id=state.session_id, spec=state.spec, prompt=state.prompt,
                            chunk_index=state.chunk_index, tensors=tensors, meta=json.loads(json.dumps(state.meta)))
    return SessionBlob(session_id=blob.session_id, spec=blob.spec, prompt=blob.prompt,
                       chunk_index=blob.chunk_index, nbytes=new_state.nbytes(), payload=new_state)


def _encode_header(blob: SessionBlob, state: StreamState) -> bytes:
    header = {
        "protocol": _PROTOCOL,
        "session_id": blob.session_id,
        "chunk_index": blob.chunk_index,
        "spec": state.spec.to_dict(),
        "prompt": state.prompt,
        "state_session_id": state.session_id,
        "state_chunk_index": state.chunk_index,
        "meta": state.meta,
        "tensors": [[name, list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in state.tensors.items()],
    }
    try:
        return json.dumps(header).encode("utf-8")
    except TypeError as exc:
        raise TransferError(f"session {blob.session_id!r} meta is not JSON-able: {exc}") from exc


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype)."""
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=t.device)
    return t.reshape(-1).view(torch.uint8)


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise TransferError(f"unknown tensor dtype {name!r} in transfer header")
    return dt
