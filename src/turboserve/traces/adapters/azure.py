"""Azure LLM inference trace (2023, conversation service) -> streaming-video sessions.

In: the CSV `TIMESTAMP,ContextTokens,GeneratedTokens` (timestamps like
`2023-11-16 18:15:46.6805900`, UTC, 7 fractional digits). Out: `SessionRecord`s.

Mapping:
- Arrivals: TIMESTAMP, as seconds since the first request.
- Sessions and periods: the trace carries no conversation id and no prefix hashes, so turns
  cannot be linked; each request is one session with one active period and no idle time
  (this under-represents idle periods; Mooncake's adapter is the one with multi-turn
  sessions).
- Active length: `GeneratedTokens * video_s_per_token` seconds of video (default 0.1 s per
  token, as for Mooncake: the median of 129 tokens becomes ~13 s), at least `min_active_s`.
  ContextTokens is kept in `meta`.
- Specs: drawn as in the synthetic generator (shape, steps mix), seeded.
"""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path
from typing import Iterable

import numpy as np

from ...types import Period, SessionRecord
from ..synth import SessionSampler
from . import input_files

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def _parse_time(s: str) -> float:
    # Python parses at most 6 fractional digits; the trace has 7
    s = s.strip()
    if "." in s:
        head, frac = s.split(".", 1)
        return datetime.fromisoformat(head).timestamp() + float("0." + frac)
    return datetime.fromisoformat(s).timestamp()


def load_requests(paths: Iterable[str | Path]) -> list[tuple[float, int, int]]:
    rows = []
    for path in input_files(paths, "*.csv", "Azure trace file"):
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: not an Azure LLM trace; missing columns {missing} (have {reader.fieldnames})")
            for lineno, r in enumerate(reader, 2):
                try:
                    rows.append((_parse_time(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"])))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{path}:{lineno}: bad row ({e})") from None
    rows.sort()
    return rows


def convert(paths: Iterable[str | Path], shape: str = "demo91", frames_per_chunk: int = 4, seed: int = 0,
            video_s_per_token: float = 0.1, min_active_s: float = 1.0, fps: float = 16.0) -> list[SessionRecord]:
    rows = load_requests(paths)
    sampler = SessionSampler(np.random.default_rng(seed), shape, frames_per_chunk, fps)
    t0 = rows[0][0] if rows else 0.0
    width = max(4, len(str(len(rows))))
    out = []
    for n, (t, ctx, gen) in enumerate(rows):
        active = max(min_active_s, gen * video_s_per_token)
        meta = {"source": "azure", "context_tokens": ctx, "generated_tokens": gen}
        out.append(sampler.record(f"az{n:0{width}d}", t - t0, (Period(round(active, 3), 0.0),), meta))
    return out
