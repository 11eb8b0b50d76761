"""What-if copies of worker loads: apply placements and migrations without touching the view.

In: a `ClusterView` (its workers' `groups`, `load_ms`, `used_bytes`) and a `ModelCache`.
Out: predicted loads and free bytes after hypothetical changes. A `WhatIf` overlays only
the workers a decision touches, so building one is O(1) and each change costs O(groups on
that worker). Loads are recomputed exactly like `policy.load.cycle_ms` (same group order,
same per-group function), so a what-if of "nothing changed" equals the view.

`LoadOrder` keeps every worker sorted by its what-if load for the min-max searches
(least loaded first, the bottleneck last), updated in O(log W) per change.
"""

from __future__ import annotations

import bisect
from typing import Iterable, Iterator

from ..types import CompatKey, WorkerId
from .latency import LatencyModel, ShapeInfo
from .load import GroupLoad, group_round_ms
from .views import ClusterView
from .worker_index import WorkerIndex

_MAX_ENTRIES = 200_000  # memo size before it is dropped (keeps memory bounded on long runs)


class ModelCache:
    """Memoised latency-model queries. Pure: each entry is a function of its key only, so
    sharing one cache across calls never changes a decision, it only makes it faster."""

    def __init__(self, model: LatencyModel, max_batch: int):
        self.model = model
        self.max_batch = max_batch
        self._group_ms: dict[GroupLoad, float] = {}
        self._shape: dict[str, ShapeInfo] = {}
        self._fixed: dict[str, float] = {}
        # Per-worker scan results and load order per SLO setting, redone only for workers
        # whose view record changed: see `worker_index`.
        self._worker_index: dict[float | None, WorkerIndex] = {}
        self._full_state: dict[str, int] = {}
        self._activation: dict[tuple[str, int], int] = {}
        self._capacity: dict[tuple[str, float, int], int] = {}
        self._state: dict[tuple[str, float], int] = {}
        # (CompatKey, SLO ms, host link alpha ms, GB/s) -> whether a restore meets the SLO
        # (`offload.resume_meets_slo`)
        self.resume_ok: dict[tuple, bool] = {}

    def matches(self, model: LatencyModel, max_batch: int) -> bool:
        return self.model is model and self.max_batch == max_batch

    def worker_index(self, slo_ms: float | None) -> WorkerIndex:
        v = self._worker_index.get(slo_ms)
        if v is None:
            v = self._worker_index[slo_ms] = WorkerIndex()
        return v

    def group_ms(self, g: GroupLoad) -> float:
        """`policy.load.group_round_ms` of one group, memoised."""
        v = self._group_ms.get(g)
        if v is None:
            if len(self._group_ms) > _MAX_ENTRIES:
                self._group_ms.clear()
            v = group_round_ms(g, self.model, self.max_batch)
            self._group_ms[g] = v
        return v

    def cycle_ms(self, groups: Iterable[GroupLoad]) -> float:
        """`policy.load.cycle_ms`, bit-identical (same summation order)."""
        return sum(self.group_ms(g) for g in groups)

    @property
    def monotone(self) -> bool:
        """Whether the model declares round times that never fall as batch or context grow,
        and contexts capped at each shape's window (`round_ms_monotone`)."""
        return bool(getattr(self.model, "round_ms_monotone", False))

    def fixed_ms(self, shape: str) -> float:
        v = self._fixed.get(shape)
        if v is None:
            v = self._fixed[shape] = float(self.model.fixed_ms(shape))
        return v

    def shape(self, name: str) -> ShapeInfo:
        v = self._shape.get(name)
        if v is None:
            v = self._shape[name] = self.model.shape(name)
        return v

    def state_bytes(self, shape: str, context_frames: float) -> int:
        k = (shape, context_frames)
        v = self._state.get(k)
        if v is None:
            if len(self._state) > _MAX_ENTRIES:
                self._state.clear()
            v = self._state[k] = int(self.model.state_bytes(shape, context_frames))
        return v

    def full_state_bytes(self, shape: str) -> int:
        """A session's state at its full attention window: what placement must reserve."""
        v = self._full_state.get(shape)
        if v is None:
            v = self._full_state[shape] = self.state_bytes(shape, self.shape(shape).window_frames)
        return v

    def activation_bytes(self, shape: str, batch: int) -> int:
        b = min(batch, self.max_batch)  # a round never batches more than max_batch
        k = (shape, b)
        v = self._activation.get(k)
        if v is None:
            v = self._activation[k] = int(self.model.activation_bytes(shape, b)) if b > 0 else 0
        return v

    def capacity(self, shape: str, slo_ms: float, steps: int) -> int:
        """Sessions of the shape one GPU serves within `slo_ms` at their full window: the
        model's capacity (one round), or fewer where that is more than `max_batch` and the
        engine gives them their chunks in several rounds per cycle (`group_round_ms`)."""
        k = (shape, slo_ms, steps)
        v = self._capacity.get(k)
        if v is None:
            v = int(self.model.capacity(shape, slo_ms, steps))
            if v > self.max_batch:
                window = float(self.shape(shape).window_frames)
                key = CompatKey(shape, 0, 0, 0, steps)
                n = self.max_batch  # one round of max_batch: within the SLO, as v > max_batch
                while n < v and group_round_ms(GroupLoad(key, n + 1, (n + 1) * window), self.model,
                                               self.max_batch) <= slo_ms:
                    n += 1
                v = n
            self._capacity[k] = v
        return v


def cache_for(view: ClusterView, previous: ModelCache | None) -> ModelCache:
    """The cache to use for this view: the previous one while the model is the same."""
    max_batch = view.config.engine.max_batch
    if previous is not None and previous.matches(view.model, max_batch):
        return previous
    return ModelCache(view.model, max_batch)


def groups_plus(groups: tuple[GroupLoad, ...], key: CompatKey, context: float) -> tuple[GroupLoad, ...]:
    """The groups after one active session of `key` at `context` joins (new keys append)."""
    for i, g in enumerate(groups):
        if g.key == key:
            return groups[:i] + (g.plus(context),) + groups[i + 1:]
    return groups + (GroupLoad(key, 1, float(context)),)


def groups_minus(groups: tuple[GroupLoad, ...], key: CompatKey, context: float) -> tuple[GroupLoad, ...]:
    """The groups after one active session of `key` at `context` leaves (empty groups go)."""
    for i, g in enumerate(groups):
        if g.key == key:
            if g.batch <= 1:
                return groups[:i] + groups[i + 1:]
            return groups[:i] + (g.minus(context),) + groups[i + 1:]
    raise ValueError(f"no group {key} to remove a session from")


class WhatIf:
    """A copy-on-write overlay of worker loads and memory over one `ClusterView`."""

    def __init__(self, view: ClusterView, cache: ModelCache):
        self.view = view
        self.cache = cache
        self._groups: dict[WorkerId, tuple[GroupLoad, ...]] = {}
        self._load: dict[WorkerId, float] = {}
        self._used: dict[WorkerId, int] = {}
        self.listeners: list[LoadOrder] = []  # kept in step with every load change

    # -- reads --------------------------------------------------------------------------
    def groups(self, wid: WorkerId) -> tuple[GroupLoad, ...]:
        g = self._groups.get(wid)
        return self.view.workers[wid].groups if g is None else g

    def load(self, wid: WorkerId) -> float:
        v = self._load.get(wid)
        return self.view.workers[wid].load_ms if v is None else v

    def used_bytes(self, wid: WorkerId) -> int:
        v = self._used.get(wid)
        return self.view.workers[wid].used_bytes if v is None else v

    def free_bytes(self, wid: WorkerId) -> int:
        return self.view.workers[wid].memory_bytes - self.used_bytes(wid)

    def group(self, wid: WorkerId, key: CompatKey) -> GroupLoad | None:
        for g in self.groups(wid):
            if g.key == key:
                return g
        return None

    def load_with(self, wid: WorkerId, key: CompatKey, context: float) -> float:
        """Predicted load if one more active session of `key` runs on `wid`."""
        return self.load_joining(self.groups(wid), key, context)

    def load_joining(self, groups: tuple[GroupLoad, ...], key: CompatKey, context: float) -> float:
        """The load of `groups` once one more active session of `key` joins them."""
        if len(groups) == 1 and groups[0].key == key:  # the common case, without copies
            g = groups[0]
            return 0 + self.cache.group_ms(GroupLoad(key, g.batch + 1, g.context_sum + context))
        return self.cache.cycle_ms(groups_plus(groups, key, context))

    def load_without(self, wid: WorkerId, key: CompatKey, context: float) -> float:
        """Predicted load if one active session of `key` leaves `wid`."""
        return self.cache.cycle_ms(groups_minus(self.groups(wid), key, context))

    def activation_need(self, wid: WorkerId, key: CompatKey | None = None) -> int:
        """Transient bytes the worker's largest round needs, with one more session of `key`."""
        return self._activation_need(self.groups(wid), key)[0]

    def _activation_need(self, groups: tuple[GroupLoad, ...], key: CompatKey | None) -> tuple[int, bool]:
        """(activation bytes of the largest round with one more session of `key`, whether
        that session joins one of `groups`)."""
        need = 0
        joined = False
        activation = self.cache.activation_bytes
        for g in groups:
            batch = g.batch
            if key is not None and g.key == key:
                batch += 1
                joined = True
            a = activation(g.key.model, batch)
            if a > need:
                need = a
        if key is not None and not joined:
            need = max(need, activation(key.model, 1))
        return need, joined

    def fits(self, wid: WorkerId, key: CompatKey, nbytes: int, headroom_frac: float) -> bool:
        """Room on `wid` for `nbytes` of state plus the activations of its largest round,
        never planning the `headroom_frac` of its memory kept for fragmentation."""
        return self.room_to_join(wid, key, nbytes, headroom_frac) is not None

    def room_to_join(self, wid: WorkerId, key: CompatKey, nbytes: int,
                     headroom_frac: float) -> tuple[tuple[GroupLoad, ...], bool] | None:
        """`fits` with what a placement reads next: (the worker's groups, whether the session
        joins one of them) when it fits, else None."""
        w = self.view.workers[wid]
        used = self._used.get(wid)
        mem = w.memory_bytes
        room = mem - (w.used_bytes if used is None else used) - int(headroom_frac * mem)
        if room < nbytes:
            return None
        groups = self._groups.get(wid)
        if groups is None:
            groups = w.groups
        if len(groups) == 1 and groups[0].key is key:  # the common case, without the loop
            need = max(0, self.cache.activation_bytes(key.model, groups[0].batch + 1))
            return (groups, True) if room - need >= nbytes else None
        need, joined = self._activation_need(groups, key)
        return (groups, joined) if room - need >= nbytes else None

    def changed_loads(self) -> list[tuple[WorkerId, float]]:
        """(worker, what-if load) for every worker whose load a change here has set."""
        return list(self._load.items())

    # -- changes ------------------------------------------------------------------------
    def add(self, wid: WorkerId, key: CompatKey, context: float, nbytes: int, active: bool = True) -> None:
        self._used[wid] = self.used_bytes(wid) + nbytes
        if active:
            self._set_groups(wid, groups_plus(self.groups(wid), key, context))

    def remove(self, wid: WorkerId, key: CompatKey, context: float, nbytes: int, active: bool = True) -> None:
        self._used[wid] = max(0, self.used_bytes(wid) - nbytes)
        if active:
            self._set_groups(wid, groups_minus(self.groups(wid), key, context))

    def move(self, src: WorkerId, dst: WorkerId, key: CompatKey, context: float, nbytes: int,
             active: bool = True) -> None:
        """A migration: its load leaves `src` and `nbytes` are reserved on `dst` now, but
        `src` holds the session's memory until the move commits, so nothing decided in the
        same call may count on it (a worker can be a source and a destination at once)."""
        self.remove(src, key, context, 0, active)
        self.add(dst, key, context, nbytes, active)

    def _set_groups(self, wid: WorkerId, groups: tuple[GroupLoad, ...]) -> None:
        self._groups[wid] = groups
        load = self.cache.cycle_ms(groups)
        self._load[wid] = load
        for order in self.listeners:
            order.update(wid, load)


class LoadOrder:
    """Workers sorted by (what-if load, provisioning order): least loaded first.

    Ties fall to the earlier-provisioned worker, so equal inputs give equal choices."""

    def __init__(self, whatif: WhatIf, wids: Iterable[WorkerId]):
        self._entry: dict[WorkerId, tuple[float, int, WorkerId]] = {}
        entries = []
        for i, wid in enumerate(wids):
            e = (whatif.load(wid), i, wid)
            self._entry[wid] = e
            entries.append(e)
        entries.sort()
        self._sorted = entries
        whatif.listeners.append(self)

    @classmethod
    def of_index(cls, whatif: WhatIf, index: WorkerIndex) -> "LoadOrder":
        """The order of every worker of `index` (refreshed for `whatif.view`), with the
        what-if's changes so far applied: the same order as built from the view's workers,
        in O(W) copying plus O(log W) per worker the what-if changed."""
        order = cls.__new__(cls)
        order._entry = dict(index.entry)
        order._sorted = list(index.by_load)
        for wid, load in whatif.changed_loads():
            order.update(wid, load)
        whatif.listeners.append(order)
        return order

    def __len__(self) -> int:
        return len(self._sorted)

    def update(self, wid: WorkerId, load: float) -> None:
        old = self._entry.get(wid)
        if old is None:
            return
        del self._sorted[bisect.bisect_left(self._sorted, old)]
        new = (load, old[1], wid)
        bisect.insort(self._sorted, new)
        self._entry[wid] = new

    def ascending(self) -> Iterator[tuple[float, int, WorkerId]]:
        """(load, order, worker) from the least loaded; safe to update while iterating only
        if the caller stops iterating after an update."""
        return iter(self._sorted)

    def descending(self) -> Iterator[tuple[float, int, WorkerId]]:
        return reversed(self._sorted)

    def top(self) -> tuple[float, int, WorkerId] | None:
        return self._sorted[-1] if self._sorted else None

    def second(self) -> float:
        """The second-highest load: for any worker, a lower bound of the highest load among
        the others."""
        return self._sorted[-2][0] if len(self._sorted) > 1 else 0.0

    def order_of(self, wid: WorkerId) -> int:
        return self._entry[wid][1]
