"""Synthetic bursty session traces, seeded and deterministic.

In: a `SynthConfig` (length, mean rate, seed, burstiness, length laws, spec mix) and the
shape whose chunk size the specs use. Out: `SessionRecord`s sorted by arrival.

The process, and why:
- Arrivals are a Markov-modulated Poisson process: a calm and a burst state with
  exponential sojourns; the burst state's rate is `burst_ratio` times the calm one, and the
  two levels are normalised so the long-run mean is `rate_per_min`. Bursts are what make
  a fixed GPU count either overloaded or wasted.
- Times a daily cycle compressed to the trace length: `1 - daily_amplitude * cos(2 pi t /
  T)`, quiet at both ends and busy in the middle, like a day of user traffic.
- Session lengths (total active video seconds) are heavy tailed: lognormal body with a
  Pareto tail, truncated to [min, max]; most sessions are short, a few run for many
  minutes (session duration heterogeneity).
- A session alternates active and idle periods: a geometric number of active periods,
  the active total split among them at random, lognormal idle gaps between them.
- Specs: the given shape, 16 fps, the shape's video frames per chunk, a seed each, and
  denoising steps drawn from `steps_mix` (4 alone by default; e.g. 4 and 2, a faster,
  lower-quality tier that coalesces only within its own group).
`SessionSampler` (lengths, periods, specs) is reused by adapters that only know arrivals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..types import Period, SessionRecord, SessionSpec

PROMPTS = (
    "a red fox running through fresh snow, morning light",
    "drone shot over a coastal town at sunset",
    "a cat playing piano in a jazz bar",
    "first-person walk through a neon-lit market at night",
    "timelapse of clouds over mountain peaks",
    "a paper boat drifting down a rainy street",
    "an astronaut gardening on the moon",
    "waves crashing on black volcanic sand",
)


@dataclass(frozen=True)
class SessionLaw:
    """How long sessions are and how they alternate; all times in seconds of wall/video."""

    length_median_s: float = 60.0  # lognormal body of total active video seconds
    length_sigma: float = 1.0
    tail_prob: float = 0.1  # share of sessions drawn from the Pareto tail
    tail_alpha: float = 1.5
    tail_min_s: float = 180.0
    min_active_s: float = 5.0  # truncation of the total active seconds
    max_active_s: float = 1800.0
    mean_periods: float = 2.0  # geometric number of active periods (>= 1)
    max_periods: int = 12
    idle_median_s: float = 20.0  # lognormal idle gap between active periods
    idle_sigma: float = 1.0
    max_idle_s: float = 600.0
    # (steps, probability). One step count by default: sessions of different step counts
    # cannot share a round, so a mix lowers every GPU's capacity (`--steps-mix 4:0.8,2:0.2`).
    steps_mix: tuple[tuple[int, float], ...] = ((4, 1.0),)


class SessionSampler:
    """Draws what a session wants (spec, periods, prompt) for a given arrival."""

    def __init__(self, rng: np.random.Generator, shape: str, frames_per_chunk: int, fps: float = 16.0,
                 law: SessionLaw = SessionLaw()):
        self.rng, self.shape, self.frames_per_chunk, self.fps, self.law = rng, shape, frames_per_chunk, fps, law
        self._steps = np.array([s for s, _ in law.steps_mix])
        p = np.array([w for _, w in law.steps_mix], dtype=float)
        self._steps_p = p / p.sum()

    def total_active_s(self) -> float:
        law, rng = self.law, self.rng
        if rng.random() < law.tail_prob:
            x = law.tail_min_s * (1.0 - rng.random()) ** (-1.0 / law.tail_alpha)  # Pareto
        else:
            x = law.length_median_s * math.exp(law.length_sigma * rng.standard_normal())
        return min(max(x, law.min_active_s), law.max_active_s)

    def periods(self, total_active_s: float) -> tuple[Period, ...]:
        law, rng = self.law, self.rng
        n = min(int(rng.geometric(1.0 / max(1.0, law.mean_periods))), law.max_periods)
        shares = rng.dirichlet(np.ones(n)) if n > 1 else np.ones(1)
        out = []
        for i, share in enumerate(shares):
            idle = 0.0
            if i < n - 1:
                idle = min(law.idle_median_s * math.exp(law.idle_sigma * rng.standard_normal()), law.max_idle_s)
            out.append(Period(round(max(float(share) * total_active_s, 0.5), 3), round(idle, 3)))
        return tuple(out)

    def periods_for(self, actives_s: list[float], idles_s: list[float]) -> tuple[Period, ...]:
        return tuple(Period(round(a, 3), round(i, 3)) for a, i in zip(actives_s, idles_s))

    def spec(self, steps: int | None = None) -> SessionSpec:
        if steps is None:
            steps = int(self.rng.choice(self._steps, p=self._steps_p))
        return SessionSpec(model=self.shape, fps=self.fps, frames_per_chunk=self.frames_per_chunk,
                           steps=steps, seed=int(self.rng.integers(0, 2**31 - 1)))

    def prompt(self) -> str:
        return PROMPTS[int(self.rng.integers(len(PROMPTS)))]

    def record(self, sid: str, arrival_s: float, periods: tuple[Period, ...] | None = None, meta: dict | None = None) -> SessionRecord:
        if periods is None:
            periods = self.periods(self.total_active_s())
        return SessionRecord(sid, round(arrival_s, 3), self.spec(), periods, self.prompt(), meta or {})


@dataclass(frozen=True)
class SynthConfig:
    hours: float = 1.0
    seed: int = 0
    rate_per_min: float = 6.0  # long-run mean arrivals per minute (before the daily cycle)
    shape: str = "demo91"
    frames_per_chunk: int = 4  # video frames per chunk; the shape's, see `synth_trace`
    fps: float = 16.0
    daily_cycle: bool = True
    daily_amplitude: float = 0.6  # rate swings between (1 - a) and (1 + a) times the mean
    burst_ratio: float = 4.0  # burst-state rate / calm-state rate
    calm_mean_s: float = 600.0  # mean sojourn in the calm state
    burst_mean_s: float = 120.0  # mean sojourn in the burst state
    law: SessionLaw = SessionLaw()


def arrival_times(cfg: SynthConfig, rng: np.random.Generator) -> list[float]:
    """Markov-modulated Poisson arrivals times the compressed daily cycle, by thinning."""
    horizon = cfg.hours * 3600.0
    if horizon <= 0 or cfg.rate_per_min <= 0:
        return []
    p_burst = cfg.burst_mean_s / (cfg.burst_mean_s + cfg.calm_mean_s)
    calm_rate = cfg.rate_per_min / 60.0 / ((1 - p_burst) + p_burst * cfg.burst_ratio)  # per second
    amp = cfg.daily_amplitude if cfg.daily_cycle else 0.0
    times: list[float] = []
    t = 0.0
    burst = rng.random() < p_burst
    while t < horizon:
        end = min(horizon, t + rng.exponential(cfg.burst_mean_s if burst else cfg.calm_mean_s))
        level = calm_rate * (cfg.burst_ratio if burst else 1.0)
        peak = level * (1 + amp)
        s = t
        while True:
            s += rng.exponential(1.0 / peak)
            if s >= end:
                break
            cycle = 1.0 - amp * math.cos(2 * math.pi * s / horizon)
            if rng.random() * (1 + amp) < cycle:
                times.append(s)
        t, burst = end, not burst
    return times


def synth_trace(cfg: SynthConfig = SynthConfig(), model=None) -> list[SessionRecord]:
    """Sessions of `cfg`. With a latency model, frames per chunk come from `cfg.shape`'s
    profile (e.g. 4 for demo91, 12 for the 3-latent-frame shapes)."""
    fpc = cfg.frames_per_chunk
    if model is not None:
        fpc = model.shape(cfg.shape).video_frames_per_chunk
    rng = np.random.default_rng(cfg.seed)
    arrivals = arrival_times(cfg, rng)
    sampler = SessionSampler(rng, cfg.shape, fpc, cfg.fps, cfg.law)
    width = max(4, len(str(len(arrivals))))
    return [sampler.record(f"s{i:0{width}d}", a) for i, a in enumerate(arrivals)]
