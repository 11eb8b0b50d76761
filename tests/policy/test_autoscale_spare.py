"""TurboServe's burst reserve: the spare kept beyond the demand-driven target scales with
the ceiling (`autoscale.spare_fraction` of `cluster.gpus`, at least `spare_gpus`), so that a
burst out of a quiet spell lands on capacity that is already up."""

from __future__ import annotations

import math
from dataclasses import replace

from policy_fakes import FakeCluster, run_policy

from turboserve.config import TurboConfig
from turboserve.policy.registry import get_policy


def _cfg(gpus: int, **autoscale) -> TurboConfig:
    c = TurboConfig()
    autoscale = {"headroom_k": 0.0, "lookahead_s": 0.0, **autoscale}
    return replace(c, cluster=replace(c.cluster, gpus=gpus, min_gpus=1, startup_delay_s=60.0),
                   autoscale=replace(c.autoscale, **autoscale))


def _target(gpus: int, demand_gpus: int, **autoscale) -> int:
    """Provisioned GPUs after one decision with `demand_gpus` GPUs of active sessions on
    one worker."""
    c = FakeCluster(config=_cfg(gpus, **autoscale))
    w = c.add_worker()
    for _ in range(demand_gpus * c.model.capacity("fake", 750.0, 4)):
        c.add_session(w, context=21)
    d, _ = run_policy(get_policy("turboserve"), c)
    return 1 + d.scale_out


def test_default_spare_is_a_quarter_of_the_ceiling():
    util = TurboConfig().autoscale.target_util
    # 3 GPUs of demand under a 32-GPU ceiling: 0.25 * 32 = 8 spare GPUs, not 1
    assert _target(32, 3) == math.ceil(3 / util + 8.0 - 1e-9)
    # the same demand under a 64-GPU ceiling keeps twice the reserve
    assert _target(64, 3) == math.ceil(3 / util + 16.0 - 1e-9)


def test_spare_gpus_is_the_floor_of_the_reserve():
    util = TurboConfig().autoscale.target_util
    # small ceilings: 0.25 * 3 = 0.75 < spare_gpus = 1
    assert _target(3, 1) == math.ceil(1 / util + 1.0 - 1e-9)
    assert _target(32, 3, spare_fraction=0.0) == math.ceil(3 / util + 1.0 - 1e-9)
    assert _target(32, 3, spare_fraction=0.0, spare_gpus=0.0) == math.ceil(3 / util - 1e-9)


def test_reserve_is_clamped_to_the_ceiling():
    assert _target(8, 6) == 8
