"""The discrete-event loop: a heap of `(time_s, seq, item)` on a simulated clock.

In: items pushed with the simulated time they happen at (typed events from
`turboserve.events`, or the simulator's own internal actions), and one handler.
Out: the handler is called once per item in time order (ties in push order, so a run is
deterministic); whatever it returns (`(time_s, item)` pairs) is pushed back on the heap.

There is no scheduling rule here: the handler hands events to the real `Controller` and
the engines; the loop only orders time.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable, Iterable

FollowUps = Iterable[tuple[float, Any]] | None


class EventLoop:
    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self.handled = 0  # items handled so far

    def push(self, time_s: float, item: Any) -> None:
        if time_s < self.now_s:
            # An item in the past would reorder causality; clamp to now (ties keep push order).
            time_s = self.now_s
        heapq.heappush(self._heap, (time_s, next(self._seq), item))

    def push_all(self, items: FollowUps) -> None:
        if items:
            for time_s, item in items:
                self.push(time_s, item)

    def __len__(self) -> int:
        return len(self._heap)

    def peek_time_s(self) -> float:
        """Time of the next item, +inf when the heap is empty."""
        return self._heap[0][0] if self._heap else float("inf")

    def run(self, handler: Callable[[float, Any], FollowUps], until_s: float = float("inf"),
            on_progress: Callable[[float], None] | None = None, progress_every: int = 4096) -> float:
        """Handle items in time order until the heap is empty or the next is after `until_s`.
        Returns the clock at the end (the last handled item's time, or `until_s` if reached)."""
        heap = self._heap
        pop = heapq.heappop
        push = self.push
        while heap and heap[0][0] <= until_s:
            time_s, _, item = pop(heap)
            self.now_s = time_s
            follow = handler(time_s, item)
            if follow:
                for t, it in follow:
                    push(t, it)
            self.handled += 1
            if on_progress is not None and self.handled % progress_every == 0:
                on_progress(time_s)
        if heap and until_s != float("inf"):
            self.now_s = max(self.now_s, until_s)
        return self.now_s
