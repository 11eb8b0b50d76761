import dataclasses

import pytest

from turboserve.config import ConfigError, TurboConfig, load_config
from turboserve.types import SessionSpec


def test_overrides_parse_types():
    cfg = TurboConfig().with_overrides(["autoscale.target_util=0.7", "rebalance.enabled=false", "cluster.link=pcie"])
    assert cfg.autoscale.target_util == 0.7
    assert cfg.rebalance.enabled is False
    assert cfg.link().name == "pcie"


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[autoscale]\ntarget_utl = 0.5\n")
    with pytest.raises(ConfigError, match="autoscale.target_utl"):
        load_config(f)
    with pytest.raises(ConfigError, match="section"):
        TurboConfig().with_overrides(["nosuch.key=1"])


@pytest.mark.parametrize("override, message", [
    ("autoscale.target_util=abc", "autoscale.target_util must be a number, got 'abc'"),
    ("autoscale.target_util=0", "autoscale.target_util must be in (0, 1], got 0.0"),
    ("autoscale.spare_fraction=1.5", "autoscale.spare_fraction must be in [0, 1], got 1.5"),
    ("sim.tick_s=0", "sim.tick_s must be > 0, got 0.0"),  # ticked forever
    ("sim.tick_s=nan", "sim.tick_s must be a number, got nan"),
    ("engine.max_batch=0", "engine.max_batch must be >= 1, got 0"),  # divided by zero
    ("cluster.gpus=8.5", "cluster.gpus must be an integer, got 8.5"),
    ("cluster.host_link=usb", "cluster.host_link must be one of nvlink, infiniband, pcie, ethernet"),
    ("engine.device=gpu0", "engine.device must be auto, cpu, cuda or cuda:N, got 'gpu0'"),
    ("serve.port=70000", "serve.port must be a TCP port in [0, 65535], got 70000"),
    ("slo.slo_ms=-5", "slo.slo_ms must be > 0, got -5"),
    ("rebalance.enabled=1", "rebalance.enabled must be true or false, got 1"),
])
def test_bad_values_are_named_with_what_they_must_be(override, message):
    with pytest.raises(ConfigError) as e:
        TurboConfig().with_overrides([override])
    assert message in str(e.value)


def test_values_are_checked_from_a_file_and_from_code(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[placement]\ncandidate_workers = 0\n")
    with pytest.raises(ConfigError, match="placement.candidate_workers must be >= 1, got 0"):
        load_config(f)
    with pytest.raises(ConfigError, match="offload.grace_s must be >= 0"):
        dataclasses.replace(TurboConfig().offload, grace_s=-1.0)
    ok = TurboConfig().with_overrides(["slo.slo_ms=180", "engine.device=cuda:1", "autoscale.target_util=1",
                                       "cluster.min_gpus=0", "autoscale.spare_fraction=0"])
    assert (ok.slo.slo_ms, ok.engine.device, ok.autoscale.target_util) == (180, "cuda:1", 1.0)


def test_spec_roundtrip_and_compat():
    s = SessionSpec(model="demo91", fps=16, frames_per_chunk=4, steps=4, seed=3)
    assert SessionSpec.from_dict(s.to_dict()) == s
    assert s.chunk_seconds == 0.25
    assert s.compat_key == s.with_(seed=9).compat_key
    assert s.compat_key != s.with_(steps=2).compat_key
