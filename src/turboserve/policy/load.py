"""Predicted load of a worker from its coalescing groups.

In: per compatibility group, the number of active sessions and the sum of their contexts.
Out: the worker's predicted cycle time in ms, the per-chunk latency every active session on
it sees (a worker serves its groups one round each, in turn). The controller, the engine's
snapshot and every what-if evaluation use this one function.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple

from ..types import CompatKey
from .latency import LatencyModel


class GroupLoad(NamedTuple):
    """One coalescing group's load on a worker. A named tuple rather than a frozen
    dataclass: what-ifs build and hash millions per simulated hour, and a tuple is built
    without a per-field `object.__setattr__`."""

    key: CompatKey
    batch: int  # active sessions of this group on the worker
    context_sum: float  # sum of their context lengths, latent frames

    def plus(self, context: float) -> "GroupLoad":
        return GroupLoad(self.key, self.batch + 1, self.context_sum + context)

    def minus(self, context: float) -> "GroupLoad":
        return GroupLoad(self.key, self.batch - 1, max(0.0, self.context_sum - context))


def group_round_ms(g: GroupLoad, model: LatencyModel, max_batch: int = 32) -> float:
    """Time to give every session of the group one chunk: ceil(batch / max_batch) rounds."""
    if g.batch <= 0:
        return 0.0
    rounds = math.ceil(g.batch / max_batch)
    per_round = math.ceil(g.batch / rounds)
    mean_ctx = g.context_sum / g.batch
    dit = model.round_ms(g.key.model, per_round, mean_ctx, g.key.steps)
    return rounds * dit + g.batch * model.fixed_ms(g.key.model)


def cycle_ms(groups: Iterable[GroupLoad], model: LatencyModel, max_batch: int = 32) -> float:
    return sum(group_round_ms(g, model, max_batch) for g in groups)
