"""Memory accounting of one engine: session state bytes per tier, and reservations.

In: allocations when sessions are added or imported, moves between the GPU and host
tiers (offload/restore), reservations for incoming migrations and their commit or cancel.
Out: bytes used per tier and free GPU bytes. The GPU tier has a capacity (the device's
memory for session state, weights excluded) and is never over it; no count is ever
negative. A request that does not fit raises `PoolFullError` and changes nothing.
The host tier is unbounded here (pinned host memory is far larger than a GPU's).
"""

from __future__ import annotations

from ..types import SessionId


class PoolFullError(MemoryError):
    """Not enough free GPU memory for a request; the message says how much is missing."""


class StatePool:
    __slots__ = ("capacity_bytes", "gpu_bytes", "host_bytes", "reserved_bytes", "_gpu", "_host",
                 "_reserved")

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"memory capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self.gpu_bytes = 0  # resident session state
        self.host_bytes = 0  # offloaded session state
        self.reserved_bytes = 0  # promised to incoming migrations, not yet arrived
        self._gpu: dict[SessionId, int] = {}
        self._host: dict[SessionId, int] = {}
        self._reserved: dict[SessionId, int] = {}

    # -- queries -------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        """GPU bytes in use or promised: what placement must count as taken."""
        return self.gpu_bytes + self.reserved_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.free_bytes

    def require(self, sid: SessionId, nbytes: int) -> None:
        """Raise `PoolFullError` unless `nbytes` fit, counting the session's own reservation."""
        need = nbytes - self._reserved.get(sid, 0)
        if need > self.free_bytes:
            self._raise_full(sid, need)

    def tier_of(self, sid: SessionId) -> str | None:
        if sid in self._gpu:
            return "gpu"
        if sid in self._host:
            return "host"
        return None

    def bytes_of(self, sid: SessionId) -> int:
        if sid in self._gpu:
            return self._gpu[sid]
        return self._host.get(sid, 0)

    def reserved_for(self, sid: SessionId) -> int:
        return self._reserved.get(sid, 0)

    # -- changes -------------------------------------------------------------------------
    def allocate(self, sid: SessionId, nbytes: int) -> None:
        """Put a session's state on the GPU tier, using its reservation if it has one."""
        _check_size(nbytes)
        if sid in self._gpu or sid in self._host:
            raise ValueError(f"session {sid!r} already holds memory on this engine")
        reserved = self._reserved.get(sid, 0)
        if nbytes - reserved > self.free_bytes:
            self._raise_full(sid, nbytes - reserved)
        if reserved:
            del self._reserved[sid]
            self.reserved_bytes -= reserved
        self._gpu[sid] = nbytes
        self.gpu_bytes += nbytes

    def allocate_host(self, sid: SessionId, nbytes: int) -> None:
        """Put a session's state straight on the host tier (imported while offloaded)."""
        _check_size(nbytes)
        if sid in self._gpu or sid in self._host:
            raise ValueError(f"session {sid!r} already holds memory on this engine")
        self._host[sid] = nbytes
        self.host_bytes += nbytes

    def resize(self, sid: SessionId, nbytes: int, *, force: bool = False) -> None:
        """A resident session's state changed size (e.g. its cache grew). `force` books a
        change that has already happened on the device even past capacity (free bytes go
        negative, so nothing more is admitted until memory is released)."""
        _check_size(nbytes)
        if sid in self._gpu:
            delta = nbytes - self._gpu[sid]
            if delta > self.free_bytes and not force:
                self._raise_full(sid, delta)
            self._gpu[sid] = nbytes
            self.gpu_bytes += delta
        elif sid in self._host:
            self.host_bytes += nbytes - self._host[sid]
            self._host[sid] = nbytes
        else:
            raise KeyError(f"session {sid!r} holds no memory on this engine")

    def free(self, sid: SessionId) -> int:
        """Drop a session's state from whichever tier holds it (and any reservation)."""
        nbytes = 0
        if sid in self._gpu:
            nbytes = self._gpu.pop(sid)
            self.gpu_bytes -= nbytes
        elif sid in self._host:
            nbytes = self._host.pop(sid)
            self.host_bytes -= nbytes
        self.cancel_reservation(sid)
        return nbytes

    def to_host(self, sid: SessionId) -> int:
        if sid not in self._gpu:
            raise KeyError(f"session {sid!r} is not in GPU memory on this engine")
        nbytes = self._gpu.pop(sid)
        self.gpu_bytes -= nbytes
        self._host[sid] = nbytes
        self.host_bytes += nbytes
        return nbytes

    def to_gpu(self, sid: SessionId) -> int:
        if sid not in self._host:
            raise KeyError(f"session {sid!r} is not in host memory on this engine")
        nbytes = self._host[sid]
        if nbytes > self.free_bytes:
            self._raise_full(sid, nbytes)
        del self._host[sid]
        self.host_bytes -= nbytes
        self._gpu[sid] = nbytes
        self.gpu_bytes += nbytes
        return nbytes

    def reserve(self, sid: SessionId, nbytes: int) -> None:
        """Promise GPU memory to a session that is on its way here (migration)."""
        _check_size(nbytes)
        if sid in self._reserved or sid in self._gpu:
            raise ValueError(f"session {sid!r} already holds or reserves memory on this engine")
        if nbytes > self.free_bytes:
            self._raise_full(sid, nbytes)
        self._reserved[sid] = nbytes
        self.reserved_bytes += nbytes

    def cancel_reservation(self, sid: SessionId) -> int:
        nbytes = self._reserved.pop(sid, 0)
        self.reserved_bytes -= nbytes
        return nbytes

    def _raise_full(self, sid: SessionId, need: int) -> None:
        raise PoolFullError(
            f"session {sid!r} needs {need} more bytes of GPU memory but only {self.free_bytes} of "
            f"{self.capacity_bytes} are free; offload idle sessions or place it elsewhere")


def _check_size(nbytes: int) -> None:
    if nbytes < 0:
        raise ValueError(f"state size must be >= 0 bytes, got {nbytes}")
