"""Every registered policy drives the real Controller, in-process engines and the built-in
demo91 latency model through arrivals, pauses, resumes and departures: no decision item is
ever refused by the controller's validation, and each mechanism shows up where it should."""

from __future__ import annotations

from dataclasses import replace

import pytest

from turboserve.cluster.controller import Controller
from turboserve.cluster.inprocess import InProcessTransport
from turboserve.config import TurboConfig
from turboserve.events import SessionActivated, SessionArrived, SessionDeparted, Tick
from turboserve.policy.registry import ALL, FIXED_COUNT, get_policy
from turboserve.profile import load_latency_model
from turboserve.types import SessionSpec

SPEC = SessionSpec(model="demo91", fps=16.0, frames_per_chunk=4, steps=4)


@pytest.fixture(scope="module")
def model():
    return load_latency_model()


def _run(name: str, model, n: int = 60) -> Controller:
    base = TurboConfig()
    cfg = replace(base, cluster=replace(base.cluster, gpus=4, min_gpus=1, startup_delay_s=0.0),
                  autoscale=replace(base.autoscale, scale_in_hold_s=10.0, upscale_delay_s=2.0,
                                    downscale_delay_s=10.0),
                  offload=replace(base.offload, grace_s=2.0))
    transport = InProcessTransport(model, cfg, record=False)
    ctl = Controller(get_policy(name), model, cfg, transport, shape="demo91")
    ctl.bootstrap(0.0)
    for i in range(n):  # a burst: 10 s of video each, then idle
        ctl.on_event(SessionArrived(0.1 * i, f"s{i}", SPEC, chunks_wanted=40))
    t = 0.0
    while t < 60.0:
        t += 0.5
        transport.run_until(t, t - 0.5)
        ctl.on_event(Tick(t))
        if t == 20.0:  # half of them come back for 5 s more
            for i in range(0, n, 2):
                ctl.on_event(SessionActivated(t, f"s{i}", chunks_wanted=20))
        if t == 40.0:
            for i in range(n):
                ctl.on_event(SessionDeparted(t, f"s{i}"))
    return ctl


@pytest.mark.parametrize("name", ALL)
def test_policy_runs_the_real_controller_without_refusals(name, model):
    ctl = _run(name, model)
    k = ctl.counters
    assert k.refused == 0, list(ctl.refusals)[:5]
    assert k.sessions_failed == 0
    assert k.placements >= 60
    if name in FIXED_COUNT:
        assert k.workers_started == 4 and k.workers_released == 0
    else:
        assert k.workers_started > 1 and k.workers_released > 0  # scaled out, then back in
    if name.startswith("turboserve") and name != "turboserve-no-offload":
        assert k.offloads > 0 and k.resumes > 0  # idle sessions left the GPU and came back
    else:
        assert k.offloads == 0
    if name in ("static-rr", "static-ll", "autoscale-only", "turboserve-no-migration"):
        assert k.migrations == 0
