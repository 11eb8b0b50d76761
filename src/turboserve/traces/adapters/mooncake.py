"""Mooncake conversation trace -> streaming-video sessions.

In: Mooncake JSONL (`timestamp` in ms from the trace start, `input_length`,
`output_length` in tokens, `hash_ids`: hashes of the prompt's 512-token blocks). Out:
`SessionRecord`s, one per recovered conversation.

Mapping:
- Sessions: a request continues the conversation of the earlier request with which it
  shares the longest common prefix of block hashes, if that prefix is at least
  `min_shared_blocks` (3) blocks long (a shorter match is only a shared system prompt).
  Among earlier requests with an equally long match, the latest one is taken (the most
  recent turn). On the public trace this gives ~8,500 sessions, ~1,800 multi-turn.
- Periods: each turn is an active period starting at its request time, lasting
  `output_length * video_s_per_token` seconds of video (default 0.1 s per token: a
  350-token answer, the median, becomes 35 s of video; an LLM answer and a video clip are
  both "what the user waits for and watches"), at least `min_active_s`. The idle gap before
  the next turn is that turn's arrival minus the end of this active period (0 if the next
  turn arrives earlier, i.e. the user interrupts); the last period has no idle time.
- Specs: drawn as in the synthetic generator (shape, steps mix), seeded; `meta` keeps the
  turn count and the token totals.
Matching uses rolling hashes of block prefixes, so it is linear in the total block count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ...types import Period, SessionRecord
from ..synth import SessionSampler
from . import input_files


def load_requests(paths: Iterable[str | Path]) -> list[dict]:
    rows = []
    for path in input_files(paths, "*.jsonl", "Mooncake trace file"):
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    rows.append({"t_s": float(d["timestamp"]) / 1000.0, "input": int(d["input_length"]),
                                 "output": int(d["output_length"]), "hash_ids": list(d["hash_ids"])})
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{path}:{lineno}: not a Mooncake request "
                                     f"(need timestamp, input_length, output_length, hash_ids): {e}") from None
    rows.sort(key=lambda r: r["t_s"])
    return rows


def chain_turns(requests: list[dict], min_shared_blocks: int = 3) -> list[list[int]]:
    """Group request indices (time order) into conversations by shared block prefixes."""
    latest_with_prefix: dict[int, int] = {}  # rolling hash of a prefix -> latest request index
    session_of: list[int] = []
    sessions: list[list[int]] = []
    for i, r in enumerate(requests):
        keys = []
        h = 0
        for block in r["hash_ids"]:
            h = hash((h, block))
            keys.append(h)
        parent = None
        for length in range(len(keys), min_shared_blocks - 1, -1):
            j = latest_with_prefix.get(keys[length - 1])
            if j is not None:
                parent = j
                break
        if parent is None:
            session_of.append(len(sessions))
            sessions.append([i])
        else:
            s = session_of[parent]
            session_of.append(s)
            sessions[s].append(i)
        for k in keys:
            latest_with_prefix[k] = i
    return sessions


def convert(paths: Iterable[str | Path], shape: str = "demo91", frames_per_chunk: int = 4, seed: int = 0,
            video_s_per_token: float = 0.1, min_active_s: float = 1.0, min_shared_blocks: int = 3,
            fps: float = 16.0) -> list[SessionRecord]:
    requests = load_requests(paths)
    sessions = chain_turns(requests, min_shared_blocks)
    sampler = SessionSampler(np.random.default_rng(seed), shape, frames_per_chunk, fps)
    t0 = requests[0]["t_s"] if requests else 0.0
    width = max(4, len(str(len(sessions))))
    out = []
    for n, turns in enumerate(sessions):
        reqs = [requests[i] for i in turns]
        actives = [max(min_active_s, r["output"] * video_s_per_token) for r in reqs]
        periods = []
        for k, (r, a) in enumerate(zip(reqs, actives)):
            idle = 0.0
            if k + 1 < len(reqs):
                idle = max(0.0, reqs[k + 1]["t_s"] - (r["t_s"] + a))
            periods.append(Period(round(a, 3), round(idle, 3)))
        meta = {"source": "mooncake", "turns": len(reqs), "input_tokens": sum(r["input"] for r in reqs),
                "output_tokens": sum(r["output"] for r in reqs)}
        out.append(sampler.record(f"mc{n:0{width}d}", reqs[0]["t_s"] - t0, tuple(periods), meta))
    out.sort(key=lambda r: (r.arrival_s, r.id))
    return out
