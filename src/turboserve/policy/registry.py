"""Policies by name: what `--policy` accepts in `simulate` and `serve`.

In: a name (`turboserve`, `static-rr`, ...; the DESIGN.md spelling `turboserve
--no-migration` is accepted for the ablations). Out: a fresh `Policy` object (policies keep
their state in the memory they hand back, so instances are cheap and independent).
`policy_names()` lists every name in report order; `ALL` is that tuple.
"""

from __future__ import annotations

from typing import Callable

from .baselines import AutoscaleOnlyPolicy, MigrateOnlyPolicy, StaticPolicy
from .turboserve import TurboServePolicy
from .views import Policy

_FACTORIES: dict[str, Callable[[], Policy]] = {
    "static-rr": lambda: StaticPolicy("static-rr", "round-robin"),
    "static-ll": lambda: StaticPolicy("static-ll", "least-loaded"),
    "autoscale-only": AutoscaleOnlyPolicy,
    "migrate-only": MigrateOnlyPolicy,
    "turboserve": lambda: TurboServePolicy("turboserve"),
    "turboserve-no-migration": lambda: TurboServePolicy("turboserve-no-migration", migration=False),
    "turboserve-no-autoscale": lambda: TurboServePolicy("turboserve-no-autoscale", autoscale=False),
    "turboserve-no-offload": lambda: TurboServePolicy("turboserve-no-offload", offload=False),
}

ALL: tuple[str, ...] = tuple(_FACTORIES)

# Policies whose GPU count never changes.
FIXED_COUNT: frozenset[str] = frozenset({"static-rr", "static-ll", "migrate-only", "turboserve-no-autoscale"})
# DESIGN.md's fixed-count baselines: reports run them at the count that serves the peak and
# again at turboserve's mean count (`equal-cost`, sim/cli.py).
FIXED_COUNT_BASELINES: tuple[str, ...] = ("static-rr", "static-ll", "migrate-only")


def policy_names() -> list[str]:
    """Every registered policy, in the order reports list them."""
    return list(ALL)


def _normalise(name: str) -> str:
    n = " ".join(name.strip().lower().split())
    return n.replace(" --", "-").replace(" ", "-")


def get_policy(name: str) -> Policy:
    key = _normalise(name)
    factory = _FACTORIES.get(key)
    if factory is None:
        raise ValueError(f"unknown policy {name!r}; expected one of: {', '.join(ALL)}")
    return factory()
