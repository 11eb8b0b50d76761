"""Coalescing: which due chunks run together in the next round.

In: sessions whose next chunk became due (with the time it became due), and sessions that
stop being due (paused, removed, held for migration, planned into a round).
Out: the next batch: one `CompatKey` group, the one whose oldest due chunk has waited
longest, and up to `max_batch` of its due sessions, oldest first.

Each group keeps its due sessions in a dict ordered by due time, so picking a batch costs
O(groups + batch) and marking or unmarking a session O(1). Sessions become due at
non-decreasing times on one engine's clock, so appending keeps the order; the rare
out-of-order insert (a migration that aborts returns a session that has been due for a
while) re-sorts its group.
"""

from __future__ import annotations

from ..types import CompatKey, SessionId


class BatchFormer:
    __slots__ = ("max_batch", "_due", "_key_of")

    def __init__(self, max_batch: int = 32) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._due: dict[CompatKey, dict[SessionId, float]] = {}  # key -> sid -> due_s, oldest first
        self._key_of: dict[SessionId, CompatKey] = {}

    def __len__(self) -> int:
        return len(self._key_of)

    def __contains__(self, sid: object) -> bool:
        return sid in self._key_of

    def mark_due(self, sid: SessionId, key: CompatKey, due_s: float) -> None:
        """The session's next chunk is due since `due_s`."""
        if sid in self._key_of:
            raise ValueError(f"session {sid!r} is already due")
        group = self._due.get(key)
        if group is None:
            group = self._due[key] = {}
        if group and due_s < next(reversed(group.values())):
            group[sid] = due_s
            self._due[key] = dict(sorted(group.items(), key=lambda kv: kv[1]))
        else:
            group[sid] = due_s
        self._key_of[sid] = key

    def mark_due_many(self, key: CompatKey, sids: list[SessionId], due_s: float) -> None:
        """`mark_due(sid, key, due_s)` for each of `sids`, in order (one round's sessions
        due again at its delivery time)."""
        key_of = self._key_of
        group = self._due.get(key)
        if group is None:
            group = self._due[key] = {}
        elif group and due_s < next(reversed(group.values())):
            for sid in sids:
                self.mark_due(sid, key, due_s)
            return
        for sid in sids:
            if sid in key_of:
                raise ValueError(f"session {sid!r} is already due")
            group[sid] = due_s
            key_of[sid] = key

    def unmark(self, sid: SessionId) -> float | None:
        """The session is no longer due; returns since when it was due (None if it was not)."""
        key = self._key_of.pop(sid, None)
        if key is None:
            return None
        group = self._due[key]
        due_s = group.pop(sid)
        if not group:
            del self._due[key]
        return due_s

    def oldest_due_s(self) -> float | None:
        oldest = None
        for group in self._due.values():
            first = next(iter(group.values()))
            if oldest is None or first < oldest:
                oldest = first
        return oldest

    def pick_group(self) -> CompatKey | None:
        """The group whose oldest due chunk has waited longest (ties: the smaller key)."""
        best_key = None
        best_due = 0.0
        for key, group in self._due.items():
            first = next(iter(group.values()))
            if best_key is None or first < best_due or (first == best_due and key < best_key):
                best_key, best_due = key, first
        return best_key

    def take_batch(self) -> tuple[CompatKey, list[SessionId], list[float]] | None:
        """Remove and return the next batch: (key, sids oldest first, their due times)."""
        key = self.pick_group()
        if key is None:
            return None
        group = self._due[key]
        n = min(self.max_batch, len(group))
        sids: list[SessionId] = []
        dues: list[float] = []
        it = iter(group.items())
        for _ in range(n):
            sid, due_s = next(it)
            sids.append(sid)
            dues.append(due_s)
        if n == len(group):
            del self._due[key]
        else:
            for sid in sids:
                del group[sid]
        key_of = self._key_of
        for sid in sids:
            del key_of[sid]
        return key, sids, dues

    def due_by_group(self) -> dict[CompatKey, int]:
        return {key: len(group) for key, group in self._due.items()}
