"""ServeGen per-client window statistics -> streaming-video sessions.

In: ServeGen CSVs (`chunk-N-trace.csv`, one per client, no header): `window_start` (s),
`rate` (requests/s in the 600 s window), `cv` (coefficient of variation of inter-arrival
times), `distribution` (`Gamma` / `Weibull`, empty when the window is silent), `p1`, `p2`
(the law's shape and scale). Out: `SessionRecord`s.

Mapping:
- Time compression: the 14 days are squeezed by `compress` (default 24: a day becomes an
  hour, the trace 14 hours); a 600 s window lasts `600 / compress` seconds.
- Volume: the clients' real rates (about 1,200 requests/s together) are far beyond video
  sessions, so every rate is multiplied by one factor chosen so that the merged mean is
  `rate_per_min` sessions per compressed minute. Relative rates across windows and clients
  (the daily and weekly shape, bursts) are kept.
- Inside a window, a client's count is Poisson with the window's (scaled) mean, and the
  arrivals are spaced by gaps drawn from its fitted law, Gamma(shape=p1) or
  Weibull(shape=p1), normalised to span the window (n arrivals take n + 1 gaps whose sum is
  the window). The count matches the rate and the clustering (cv) is the measured one. (The
  fitted scale p2 describes gaps inside busy stretches and disagrees with the window rate,
  so it is not used.) A window without a law spaces its arrivals as a Poisson process.
- Clients are merged into one trace; session lengths, periods and specs come from the
  synthetic generator's laws (ServeGen has requests, not sessions), seeded.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable

import numpy as np

from ...types import SessionRecord
from ..synth import SessionSampler
from . import input_files

WINDOW_S = 600.0


def _client_files(paths: Iterable[str | Path]) -> list[Path]:
    return input_files(paths, "*.csv", "ServeGen input")


def load_windows(path: Path) -> list[tuple[float, float, float, str, float, float]]:
    rows = []
    with path.open(newline="") as f:
        for lineno, r in enumerate(csv.reader(f), 1):
            if not r:
                continue
            if len(r) != 6:
                raise ValueError(f"{path}:{lineno}: expected 6 columns (window_start, rate, cv, distribution, p1, p2), got {len(r)}")
            try:
                rows.append((float(r[0]), float(r[1]), float(r[2]), r[3].strip(), float(r[4] or 0), float(r[5] or 0)))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: bad number ({e})") from None
    return rows


def _unit_gaps(rng: np.random.Generator, law: str, shape: float, n: int) -> np.ndarray:
    """n gaps of the law with mean 1."""
    if law == "Gamma" and shape > 0:
        return rng.gamma(shape, 1.0 / shape, n)
    if law == "Weibull" and shape > 0:
        return rng.weibull(shape, n) / math.gamma(1.0 + 1.0 / shape)
    return rng.exponential(1.0, n)


def client_arrivals(windows, rng: np.random.Generator, scale: float, compress: float, horizon_s: float) -> list[float]:
    times: list[float] = []
    for start, rate, _cv, law, p1, _p2 in sorted(windows):
        w0 = start / compress
        if w0 >= horizon_s:
            break
        length = min(horizon_s, w0 + WINDOW_S / compress) - w0
        n = int(rng.poisson(rate * scale * length)) if rate > 0 else 0
        if n == 0:
            continue
        gaps = _unit_gaps(rng, law, p1, n + 1)
        positions = np.cumsum(gaps)
        times.extend((w0 + length * positions[:n] / positions[n]).tolist())
    return times


def convert(paths: Iterable[str | Path], shape: str = "demo91", frames_per_chunk: int = 4, seed: int = 0,
            compress: float = 24.0, rate_per_min: float = 6.0, hours: float | None = None,
            fps: float = 16.0) -> list[SessionRecord]:
    if compress <= 0 or rate_per_min <= 0:
        raise ValueError("compress and rate_per_min must be > 0")
    clients = [(f, load_windows(f)) for f in _client_files(paths)]
    span = max((w[0] for _, ws in clients for w in ws), default=0.0) + WINDOW_S
    total_requests = sum(w[1] * WINDOW_S for _, ws in clients for w in ws)
    if total_requests <= 0:
        raise ValueError("ServeGen input has no arrivals (every window's rate is 0)")
    # merged mean rate (per real second) times scale = rate_per_min / 60 per compressed second
    scale = (rate_per_min / 60.0) / (total_requests / span)
    horizon = span / compress if hours is None else min(span / compress, hours * 3600.0)
    rng = np.random.default_rng(seed)
    arrivals: list[tuple[float, str]] = []
    for f, ws in clients:
        arrivals.extend((t, f.stem) for t in client_arrivals(ws, rng, scale, compress, horizon))
    arrivals.sort()
    sampler = SessionSampler(rng, shape, frames_per_chunk, fps)
    width = max(4, len(str(len(arrivals))))
    return [sampler.record(f"sg{n:0{width}d}", t, meta={"source": "servegen", "client": c})
            for n, (t, c) in enumerate(arrivals)]
