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


def test_spec_roundtrip_and_compat():
    s = SessionSpec(model="demo91", fps=16, frames_per_chunk=4, steps=4, seed=3)
    assert SessionSpec.from_dict(s.to_dict()) == s
    assert s.chunk_seconds == 0.25
    assert s.compat_key == s.with_(seed=9).compat_key
    assert s.compat_key != s.with_(steps=2).compat_key
