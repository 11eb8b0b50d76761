"""Configuration: one frozen dataclass per concern, gathered in `TurboConfig`.

In: a TOML file (sections named like the fields of `TurboConfig`) and/or CLI overrides of
the form `section.key=value`. Out: a validated, immutable `TurboConfig`. Unknown sections or
keys are errors that name what was expected, so a typo never silently does nothing. Each
section checks its values when it is built (from a file, an override or code): a value of
the wrong type or out of its range is a `ConfigError` that names the key, what it must be
and what it got, not a crash or a hang deep in a run.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any, Callable, get_type_hints


class ConfigError(ValueError):
    pass


Rule = tuple[Callable[[Any], bool], str]  # (holds for a good value, what a good value is)


def at_least(lo: float) -> Rule:
    return (lambda v: v >= lo, f">= {lo:g}")


def above(lo: float) -> Rule:
    return (lambda v: v > lo, f"> {lo:g}")


def fraction(*, zero: bool = True, one: bool = True) -> Rule:
    """A value in [0, 1], without 0 or 1 where they are excluded."""
    lo, hi = ("[" if zero else "("), ("]" if one else ")")
    return (lambda v: (v >= 0 if zero else v > 0) and (v <= 1 if one else v < 1), f"in {lo}0, 1{hi}")


def one_of(*values: str) -> Rule:
    return (lambda v: v in values, "one of " + ", ".join(values))


DEVICE: Rule = (lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
                "auto, cpu, cuda or cuda:N")
PORT: Rule = (lambda v: 0 <= v <= 65535, "a TCP port in [0, 65535]")
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if hint is str:
        return isinstance(value, str)
    args = getattr(hint, "__args__", None)  # `X | None`
    if args:
        return any(a is type(None) and value is None or a is not type(None) and _type_ok(value, a) for a in args)
    return True


def check_section(obj: Any, section: str, **rules: Rule) -> None:
    """Every field of a config section has its declared type, and each ruled one keeps its
    rule (None, where a field allows it, is not ruled); else a `ConfigError`."""
    hints = _hints(type(obj))
    for f in fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if not _type_ok(value, hint):
            kinds = [_TYPE_NAMES.get(a, str(a)) for a in getattr(hint, "__args__", (hint,)) if a is not type(None)]
            raise ConfigError(f"{section}.{f.name} must be {' or '.join(kinds)}, got {value!r}")
        rule = rules.get(f.name)
        if rule is not None and value is not None and not rule[0](value):
            raise ConfigError(f"{section}.{f.name} must be {rule[1]}, got {value!r}")


@dataclass(frozen=True)
class SloConfig:
    slo_ms: float | None = None  # per-chunk latency target; None = the chunk's playback time

    def __post_init__(self) -> None:
        check_section(self, "slo", slo_ms=above(0))


@dataclass(frozen=True)
class LinkConfig:
    """An alpha-beta link: a transfer of n bytes takes alpha_ms + n / bandwidth."""

    name: str = "nvlink"
    alpha_ms: float = 2.0  # fixed cost per transfer (setup, handshake, sync)
    bandwidth_gbps: float = 150.0  # GB/s (1e9 bytes) of payload


LINKS: dict[str, LinkConfig] = {
    # Effective payload rates, not line rates: NVLink4 p2p through NCCL, 400G IB, PCIe 5 x16.
    "nvlink": LinkConfig("nvlink", alpha_ms=2.0, bandwidth_gbps=150.0),
    "infiniband": LinkConfig("infiniband", alpha_ms=5.0, bandwidth_gbps=40.0),
    "pcie": LinkConfig("pcie", alpha_ms=3.0, bandwidth_gbps=25.0),
    "ethernet": LinkConfig("ethernet", alpha_ms=10.0, bandwidth_gbps=10.0),
}


@dataclass(frozen=True)
class ClusterConfig:
    gpus: int = 8  # fixed count for fixed-count policies; ceiling for autoscaling ones
    min_gpus: int = 1
    gpu_memory_bytes: int = 80 * 10**9  # H100 80GB
    startup_delay_s: float = 60.0  # from scale-out decision to a ready worker
    price_per_gpu_hour_usd: float = 2.50  # on-demand
    spot_price_per_gpu_hour_usd: float = 1.00
    spot_fraction: float = 0.0  # share of provisioned GPUs billed at the spot price
    link: str = "nvlink"  # GPU-GPU migration link, a key of LINKS
    host_link: str = "pcie"  # GPU<->host offload/restore link, a key of LINKS

    def __post_init__(self) -> None:
        check_section(self, "cluster", gpus=at_least(1), min_gpus=at_least(0), gpu_memory_bytes=above(0),
                      startup_delay_s=at_least(0), price_per_gpu_hour_usd=at_least(0),
                      spot_price_per_gpu_hour_usd=at_least(0), spot_fraction=fraction(),
                      link=one_of(*LINKS), host_link=one_of(*LINKS))


@dataclass(frozen=True)
class PlacementConfig:
    memory_headroom: float = 0.05  # fraction of GPU memory never planned (fragmentation)
    candidate_workers: int = 32  # min-max placement scores at most this many feasible workers

    def __post_init__(self) -> None:
        check_section(self, "placement", memory_headroom=fraction(one=False), candidate_workers=at_least(1))


@dataclass(frozen=True)
class RebalanceConfig:
    # min-max rebalancing (turboserve) and pairwise balancing (migrate-only); draining a
    # worker before its release still migrates
    enabled: bool = True
    eta: float = 1.0  # weight of migration cost (ms of downtime) against latency gain (ms)
    gain_threshold_ms: float = 5.0  # apply a move only if it gains more than this
    max_moves_per_decision: int = 4
    cooldown_s: float = 10.0  # a migrated session is not moved again within this time
    candidate_workers: int = 4  # destinations evaluated per session (least loaded first)
    candidate_sessions: int = 8  # distinct sessions of the bottleneck evaluated per move
    # Share of the destination's cycle a migrated session waits for the round in progress
    # there before its own (1 = worst case; 0 if commits align with destination rounds).
    dst_wait: float = 1.0
    poll_interval_s: float = 5.0  # migrate-only baseline: Llumnix-style polling period
    # TurboServe: sessions that regrouping (`policy/regroup.py`: every session of one group
    # off a worker holding several, so it runs one round) may move per decision, beside
    # max_moves_per_decision; 0 = off
    regroup_max_sessions: int = 16
    # TurboServe: regrouping's destinations end within this share of the moved sessions'
    # SLO, so that the group keeps room there for its next arrivals (which would otherwise
    # go beside another group again)
    regroup_fill: float = 0.8

    def __post_init__(self) -> None:
        check_section(self, "rebalance", eta=at_least(0), gain_threshold_ms=at_least(0), max_moves_per_decision=at_least(0),
                      cooldown_s=at_least(0), candidate_workers=at_least(1), candidate_sessions=at_least(1),
                      dst_wait=fraction(), poll_interval_s=above(0), regroup_max_sessions=at_least(0),
                      regroup_fill=fraction(zero=False))


@dataclass(frozen=True)
class AutoscaleConfig:
    # TurboServe's autoscaler (off: as turboserve-no-autoscale); autoscale-only always scales
    enabled: bool = True
    # fraction of per-GPU capacity planned to be used, where a GPU holds several sessions
    # (TurboServe: a session that is a GPU's whole capacity is planned one GPU, not 1/0.85:
    # wan14b-480p; bench/sim_matrix.py, its 24 runs: GPU-hours 10.8% -> 12.9% below N)
    target_util: float = 0.85
    volatility_window_s: float = 120.0  # sliding window for demand volatility
    headroom_k: float = 1.5  # extra GPUs per standard deviation of recent demand
    # demand must stay low this long before releasing GPUs; release is down to the highest
    # target seen during the hold. 300 s, as Kubernetes' HPA stabilises scale-down: at 180 s
    # the 64-GPU synthetic matrix cell released 11 GPUs 30 s before a burst (SLO 99.84%;
    # 100.00% at 300 s, for 2.5% more GPU-hours over the synthetic cells)
    scale_in_hold_s: float = 300.0
    # autoscaling policies' workers ready at time 0; 0 = min_gpus live, and in the simulator
    # the trace's demand over its first start-up delay (warm start: sim.driver.warm_start_gpus)
    initial_gpus: int = 0
    # TurboServe: also provision for demand extrapolated this far ahead along its recent
    # rise (the start-up delay plus the time a scale-out takes to be decided and filled,
    # with margin); 0 = off (current demand and std only)
    lookahead_s: float = 120.0
    # TurboServe: the rise is the least-squares slope of demand over this much recent
    # history (0 = lookahead_s). Shorter than the lookahead, so that the onset of a burst
    # out of a flat spell is not averaged away by the flat samples before it
    rise_window_s: float = 30.0
    # TurboServe: the rise projected is the slope less this many standard errors, so that
    # noise (single arrivals and departures) is not projected over the lookahead; 0 = off
    rise_confidence_z: float = 3.0
    # TurboServe: the rise projected is also less this many sessions' GPUs (demand per
    # active or pending session) per rise_window_s, so that a couple of arrivals is not read
    # as a ramp. Where a session is a large share of a GPU (wan1.3b-320p: half) two arrivals in
    # 30 s projected 2-3 GPUs of rise over the lookahead, and these spikes kept every GPU
    # up: the scale-in hold never ran out (bench/sim_matrix.py, two seeds: GPU-hours 7.6% ->
    # 12.3% below the peak count; wan1.3b-320p's worst chunks rose in 9 of 24 runs, at most
    # 384 -> 782 ms, still far below static-ll's)
    rise_min_sessions: float = 2.0
    # TurboServe: whether the level the scale-in hold releases down to (the highest target
    # seen during the hold) counts the projected rise. Off: a forecast that did not come
    # true holds no GPUs once the hold runs out; the rise still scales out at once, and a
    # target that reaches the provisioned count still restarts the hold (bench/sim_matrix.py,
    # two seeds: GPU-hours 12.3% -> 13.1% below the peak count; wan1.3b-320p's worst chunk
    # rose in 5 of 24 runs, at most 384 -> 714 ms, static-ll 2,103)
    hold_counts_rise: bool = False
    # TurboServe: count idle sessions kept on their GPU because no restore from host memory
    # could meet the SLO (wan14b-480p: 27 GB over PCIe, ~1.1 s before a ~2 s round at a 2.6 s
    # SLO) in the demand, as if active. Otherwise the target leaves no GPU for them, a new
    # session evicts one, and its first chunk back is late (bench/sim_matrix.py, wan14b-480p
    # 32 GPUs Mooncake seed 0: 99.890% -> 99.902% SLO, 2.9% -> 1.4% saved; wan14b-480p's
    # 24 runs: 11.5% -> 10.8% saved; the other shapes' restores meet the SLO: no change)
    count_held_idle: bool = True
    # TurboServe: GPUs kept beyond the target at all times, so that a burst out of a quiet
    # spell lands on capacity that is already up (new GPUs take cluster.startup_delay_s)
    spare_gpus: float = 1.0
    # TurboServe: the spare is at least this fraction of the ceiling cluster.gpus. The
    # ceiling is the operator's bound on peak demand, and a burst out of a quiet spell can
    # bring a good part of it within one start-up delay (synthetic bursts at 16-64 GPUs rise
    # by 0.4-0.5 of the ceiling in ~90 s); the capacity it needs before new GPUs are ready
    # must already be up. 0 = spare_gpus only
    spare_fraction: float = 0.25
    # Ray Serve-style baseline (autoscale-only): desired = ongoing sessions / target per GPU
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    target_sessions_per_gpu: float = 0.0  # 0 = capacity at the SLO from the profile
    # with target_sessions_per_gpu 0, the per-GPU target is this fraction of the capacity at
    # the SLO (below 1 provisions ahead of load, as a lower target_ongoing_requests does in
    # Ray Serve); bench/sim_matrix.py lowers it to find autoscale-only's cost at turboserve's
    # worst-case latency
    target_capacity_fraction: float = 1.0

    def __post_init__(self) -> None:
        check_section(self, "autoscale", target_util=fraction(zero=False), volatility_window_s=above(0),
                      headroom_k=at_least(0), scale_in_hold_s=at_least(0), initial_gpus=at_least(0),
                      lookahead_s=at_least(0), rise_window_s=at_least(0), rise_confidence_z=at_least(0),
                      rise_min_sessions=at_least(0), spare_gpus=at_least(0), spare_fraction=fraction(),
                      upscale_delay_s=at_least(0), downscale_delay_s=at_least(0),
                      target_sessions_per_gpu=at_least(0), target_capacity_fraction=above(0))


@dataclass(frozen=True)
class OffloadConfig:
    # TurboServe's offload of idle sessions (off: as turboserve-no-offload)
    enabled: bool = True
    # an idle session is offloaded after this long (at once under pressure). Short: a session
    # that resumes on its GPU waits there for the round in progress (up to its worker's whole
    # cycle: the worst chunks of a loaded cluster), while one that resumes from host memory is
    # placed where a round starts soonest (a small state restores in milliseconds); in
    # bench/sim_matrix.py the worst chunk's reduction vs static-ll averages 41% at 0.5 s, 36%
    # at 5 s. Shapes whose restore cannot meet the SLO are not offloaded this way (offload.py)
    grace_s: float = 0.5
    # TurboServe: idle sessions that pressure evicted although their restore cannot meet the
    # SLO (wan14b-480p) go back to a GPU with room before they resume, most recently evicted
    # first, at most this many per decision (0 = off), while no session waits for a GPU.
    # In the replays, evicted sessions sat in host memory for tens to hundreds of seconds
    # while GPUs stood free, and each one's first chunk back was late (bench/sim_matrix.py,
    # wan14b-480p's 24 runs: the least SLO attainment 99.888% -> 99.906%, the 64-GPU
    # Mooncake seed-1 run 99.919% -> 99.922%; GPU-hours saved 10.83% -> 10.82%)
    prefetch_held: int = 4
    # ... leaving this many workers with room for such a session free for arrivals, which
    # would otherwise evict one again and wait for its copy to host (the 64-GPU Mooncake
    # seed-1 run, before the victim order by idle time: 99.867% SLO keeping 2 free, 99.894%
    # keeping 5, 99.885% keeping 8; 99.878% without prefetching)
    prefetch_keep_free: int = 5

    def __post_init__(self) -> None:
        check_section(self, "offload", grace_s=at_least(0), prefetch_held=at_least(0), prefetch_keep_free=at_least(0))


@dataclass(frozen=True)
class SimConfig:
    tick_s: float = 1.0  # controller tick period
    seed: int = 0
    progress: bool = True  # show a progress bar on long runs

    def __post_init__(self) -> None:
        check_section(self, "sim", tick_s=above(0))


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # sessions per coalesced round
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on cuda, float32 on cpu) | float32 | bfloat16 | float16
    attention_backend: str = ""  # diffusers attention dispatcher backend; "" = default

    def __post_init__(self) -> None:
        check_section(self, "engine", max_batch=at_least(1), dtype=one_of("auto", "float32", "bfloat16", "float16"),
                      device=DEVICE)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    storage_dir: str = "runs/recordings"  # finished sessions are recorded here as MP4
    replay_chunks: int = 64  # chunks kept per session for reconnecting clients
    max_sessions: int = 256

    def __post_init__(self) -> None:
        check_section(self, "serve", port=PORT, replay_chunks=at_least(0), max_sessions=at_least(1))


@dataclass(frozen=True)
class TurboConfig:
    slo: SloConfig = field(default_factory=SloConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def link(self, which: str = "gpu") -> LinkConfig:
        name = self.cluster.link if which == "gpu" else self.cluster.host_link
        return LINKS[name]

    def with_overrides(self, overrides: list[str] | None) -> "TurboConfig":
        cfg = self
        for item in overrides or []:
            if "=" not in item or "." not in item.split("=", 1)[0]:
                raise ConfigError(f"override {item!r} must look like section.key=value")
            path, raw = item.split("=", 1)
            section, key = path.split(".", 1)
            cfg = _set(cfg, section, {key: _parse_scalar(raw)})
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TurboConfig:
    cfg = TurboConfig()
    if path:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            cfg = _set(cfg, section, values)
    return cfg.with_overrides(overrides)


def _set(cfg: TurboConfig, section: str, values: dict[str, Any]) -> TurboConfig:
    names = {f.name for f in fields(TurboConfig)}
    if section not in names:
        raise ConfigError(f"unknown config section {section!r}; expected one of {sorted(names)}")
    current = getattr(cfg, section)
    allowed = {f.name: f for f in fields(current)}
    changes = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(f"unknown key {section}.{key}; expected one of {sorted(allowed)}")
        default = getattr(current, key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{section}.{key} must be true or false, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        changes[key] = value
    return replace(cfg, **{section: replace(current, **changes)})


def _parse_scalar(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string
