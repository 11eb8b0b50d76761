"""Profile files: the project's own format, and the shared reference format it also reads.

In: a JSON file path. Out: `ShapeProfile`s (one per model shape), the input of
`turboserve.profile.model.ProfileLatencyModel`; `save_profile` writes one back.

Own format (`"format": "turboserve-profile/1"`), one shape per file::

    {
      "format": "turboserve-profile/1",
      "shape": {                         # the fields of policy.latency.ShapeInfo
        "name": "demo91",                # shape name used by traces and --model
        "latent_frames_per_chunk": 1,    # latent frames generated per chunk
        "video_frames_per_chunk": 4,     # decoded frames delivered per chunk
        "fps": 16.0,                     # playback rate: chunk_ms = 1000 * video / fps
        "window_frames": 13,             # attention window, latent frames held in the cache
        "passes": 5,                     # forward passes per chunk in `rounds` (steps + 1)
        "weights_bytes": 2800000000,     # weights resident on each GPU
        "gpu_memory_bytes": 80000000000  # memory of the profiled device
      },
      "source": "where the numbers came from (device, software, date, estimates)",
      "device": "NVIDIA H100 80GB HBM3",
      "measured_at": "2026-11-22",
      "passes": 5,                       # same as shape.passes
      "rounds": [{"batch": 1, "context_frames": 0, "round_ms": 61.19}, ...],
                                         # one coalesced round of `batch` sessions whose
                                         # cache holds `context_frames` latent frames
      "fixed_ms": 4.5,                   # per session per chunk, not coalesced (VAE decode)
      "state_bytes": [{"context_frames": 1, "bytes": 16773120}, ...],
                                         # a session's state when its cache holds that many
                                         # latent frames
      "activation_bytes": [{"batch": 1, "bytes": 100000000}, ...],
                                         # transient memory of one round at that batch
      "transfer": {"d2h_pinned_gbps": 55.1, "h2d_pinned_gbps": 52.1,
                   "d2h_pageable_gbps": 14.2, "d2d_gbps": 1492.8},  # GB/s (1e9 bytes)
      "jitter": [0.93, 0.97, 1.0, 1.08, 1.9]   # optional: a round's time over the table's,
                                         # as evenly spaced quantiles (sorted, median ~1);
                                         # absent or [] = rounds take exactly the table's time
      "jitter_shared": [1.0, 1.2, 1.9]   # optional: the same for rounds begun while another
                                         # engine on the host was mid-round (`jitter` then
                                         # holds those begun alone)
      "jitter_unit": "ratio",            # optional: "ratio" (default) or "ms" (the tables
                                         # hold ms added to the table's time)
      "jitter_by_batch": {"2": [...]},   # optional: quantiles for rounds of that batch size
      "jitter_shared_by_batch": {"2": [...]}  # (`jitter` / `jitter_shared` for the others)
    }

`jitter` comes from `profile/calibrate.py` (rounds timed while serving); the simulator then
draws each round's time from it (seeded per worker): with `"jitter_unit": "ratio"` (the
default) the table's time times the draw, with `"ms"` the table's time plus the draw (an
excess in ms, negative below the median; what calibrate writes: interruptions on a
shared CPU last about as long whatever the round, so a ratio fitted on short rounds
overstated long rounds' tails). Its p99 needs these draws where rounds vary
(e.g. CPU engines sharing cores with each other and the server). Where engines share a
host, a round's time depends on whether another engine is computing at the same time (on
two CPU engines sharing 2 cores: a median 1.08x the profile alone, 1.35x beside the other);
`jitter_shared` lets the simulator draw the one or the other by what its other workers are
doing when the round begins, so slow rounds come together, as they do. The `_by_batch`
tables replace them for rounds of a batch size timed often enough: how long a round's
interruptions add up to depends on the round, and a table pooled over batch sizes carries
the mix of the workload it was timed on (many batch-2 rounds) into another (mostly batch 1).

Shared reference format (`../shared/profiles/*.json`): top-level keys are model names whose
value is a list of rows `{batch, cache_frames, chunk_tokens, passes, chunk_ms,
per_session_ms, kv_bytes_per_session, peak_gib, params_b}`, plus optional `copy` /
`copy_small` (transfer rates) and `vae` (decode rows at a resolution) sections. It is mapped
as follows (`shared_to_profiles`):
- `kv_bytes_per_session` covers cache + chunk, so bytes per latent frame and the latent
  frames per chunk follow from two rows with different `cache_frames`; `state_bytes` rows
  are `{cache_frames + chunk frames, kv_bytes_per_session}`.
- weights are `params_b * 1e9 * 2` bytes (bf16); activation bytes per batch are
  `peak - weights - batch * cache_frames * bytes_per_frame`, the largest over the rows of
  that batch (conservative).
- `fixed_ms` is the VAE's median per-session decode time scaled by video pixels per chunk
  (tokens per latent frame x 256 pixels x 4 video frames per latent frame); 0 without a
  `vae` section. This is an estimate away from the measured resolution.
- window: unless given, the largest measured cache plus one chunk (the measured row with
  the most context is then the steady state of a rolling window).
- video frames per chunk = 4 per latent frame (the Wan VAE's temporal stride), fps 16.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..policy.latency import ShapeInfo

FORMAT = "turboserve-profile/1"
JITTER_UNITS = ("ratio", "ms")
TRANSFER_KEYS = ("d2h_pinned_gbps", "h2d_pinned_gbps", "d2h_pageable_gbps", "d2d_gbps")
GIB = 2**30
PIXELS_PER_TOKEN = 256  # Wan: VAE 8x8 spatial stride times a 2x2 patch
VIDEO_FRAMES_PER_LATENT = 4  # Wan VAE temporal stride
H100_MEMORY_BYTES = 80 * 10**9  # as turboserve.config.ClusterConfig assumes


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class RoundPoint:
    batch: int
    context_frames: float
    round_ms: float


@dataclass
class ShapeProfile:
    shape: ShapeInfo
    rounds: list[RoundPoint]
    fixed_ms: float = 0.0
    state_bytes: list[tuple[float, int]] = field(default_factory=list)  # (context_frames, bytes)
    activation_bytes: list[tuple[int, int]] = field(default_factory=list)  # (batch, bytes)
    transfer: dict[str, float] = field(default_factory=dict)  # GB/s, keys TRANSFER_KEYS
    source: str = ""
    device: str = ""
    measured_at: str = ""
    jitter: list[float] = field(default_factory=list)  # round time / table time, quantiles
    jitter_shared: list[float] = field(default_factory=list)  # the same, rounds begun beside another
    jitter_unit: str = "ratio"  # "ratio": a round takes table time x a draw; "ms": table time + a draw
    jitter_by_batch: dict[int, list[float]] = field(default_factory=dict)  # batch -> `jitter` of its rounds
    jitter_shared_by_batch: dict[int, list[float]] = field(default_factory=dict)  # the same, `jitter_shared`

    @property
    def name(self) -> str:
        return self.shape.name

    @property
    def passes(self) -> int:
        return self.shape.passes

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "shape": asdict(self.shape),
            "source": self.source,
            "device": self.device,
            "measured_at": self.measured_at,
            "passes": self.shape.passes,
            "rounds": [
                {"batch": r.batch, "context_frames": r.context_frames, "round_ms": r.round_ms}
                for r in sorted(self.rounds, key=lambda r: (r.context_frames, r.batch))
            ],
            "fixed_ms": self.fixed_ms,
            "state_bytes": [{"context_frames": c, "bytes": b} for c, b in self.state_bytes],
            "activation_bytes": [{"batch": n, "bytes": b} for n, b in self.activation_bytes],
            "transfer": dict(self.transfer),
            **({"jitter": list(self.jitter)} if self.jitter else {}),
            **({"jitter_shared": list(self.jitter_shared)} if self.jitter_shared else {}),
            **({"jitter_unit": self.jitter_unit} if self.jitter and self.jitter_unit != "ratio" else {}),
            **({"jitter_by_batch": {str(b): list(q) for b, q in sorted(self.jitter_by_batch.items())}}
               if self.jitter_by_batch else {}),
            **({"jitter_shared_by_batch": {str(b): list(q) for b, q in sorted(self.jitter_shared_by_batch.items())}}
               if self.jitter_shared_by_batch else {}),
        }


def dumps(profile: ShapeProfile) -> str:
    """JSON text with one line per table row, so files stay short and diff well."""
    d = profile.to_dict()
    lines = ["{"]
    items = list(d.items())
    for i, (k, v) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(v, list):
            rows = ",\n".join("  " + json.dumps(r) for r in v)
            lines.append(f"{json.dumps(k)}: [\n{rows}\n]{comma}" if v else f"{json.dumps(k)}: []{comma}")
        else:
            lines.append(f"{json.dumps(k)}: {json.dumps(v)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def save_profile(profile: ShapeProfile, path: str | Path) -> None:
    Path(path).write_text(dumps(profile))


def load_profiles(path: str | Path, window_frames: dict[str, int] | None = None) -> list[ShapeProfile]:
    """Read a profile file of either format. `window_frames` overrides windows of the shared
    format by model name."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"profile file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a JSON object at the top level")
    if "format" in data:
        if data["format"] != FORMAT:
            raise ProfileError(f"{path}: unknown format {data['format']!r}; expected {FORMAT!r}")
        return [own_from_dict(data, str(path))]
    return shared_to_profiles(data, str(path), window_frames=window_frames)


def _need(d: dict, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        raise ProfileError(f"{where}: missing field {key!r}")
    return d[key]


def own_from_dict(data: dict, where: str = "<profile>") -> ShapeProfile:
    shape_d = _need(data, "shape", where)
    kwargs = {}
    for f in fields(ShapeInfo):
        value = _need(shape_d, f.name, f"{where}: shape")
        kwargs[f.name] = str(value) if f.name == "name" else (float(value) if f.name == "fps" else int(value))
    shape = ShapeInfo(**kwargs)
    passes = int(data.get("passes", shape.passes))
    if passes != shape.passes:
        raise ProfileError(f"{where}: passes {passes} differs from shape.passes {shape.passes}")
    rows = _need(data, "rounds", where)
    if not rows:
        raise ProfileError(f"{where}: field 'rounds' is empty; need at least one measured round")
    rounds = []
    for i, r in enumerate(rows):
        w = f"{where}: rounds[{i}]"
        rounds.append(RoundPoint(int(_need(r, "batch", w)), float(_need(r, "context_frames", w)), float(_need(r, "round_ms", w))))
    state = [(float(_need(r, "context_frames", f"{where}: state_bytes[{i}]")), int(_need(r, "bytes", f"{where}: state_bytes[{i}]")))
             for i, r in enumerate(data.get("state_bytes", []))]
    act = [(int(_need(r, "batch", f"{where}: activation_bytes[{i}]")), int(_need(r, "bytes", f"{where}: activation_bytes[{i}]")))
           for i, r in enumerate(data.get("activation_bytes", []))]
    profile = ShapeProfile(
        shape=shape,
        rounds=rounds,
        fixed_ms=float(_need(data, "fixed_ms", where)),
        state_bytes=state,
        activation_bytes=act,
        transfer={k: float(v) for k, v in data.get("transfer", {}).items()},
        source=str(data.get("source", "")),
        device=str(data.get("device", "")),
        measured_at=str(data.get("measured_at", "")),
        jitter=[float(x) for x in data.get("jitter", [])],
        jitter_shared=[float(x) for x in data.get("jitter_shared", [])],
        jitter_unit=str(data.get("jitter_unit", "ratio")),
        jitter_by_batch=_batch_tables(data, "jitter_by_batch", where),
        jitter_shared_by_batch=_batch_tables(data, "jitter_shared_by_batch", where),
    )
    validate(profile, where)
    return profile


def _batch_tables(data: dict, key: str, where: str) -> dict[int, list[float]]:
    tables = data.get(key, {})
    if not isinstance(tables, dict):
        raise ProfileError(f"{where}: {key} must be an object of batch size -> quantiles")
    try:
        return {int(b): [float(x) for x in q] for b, q in tables.items()}
    except (TypeError, ValueError):
        raise ProfileError(f"{where}: {key} must map batch sizes (integers) to lists of numbers") from None


def validate(p: ShapeProfile, where: str) -> None:
    s = p.shape
    if s.latent_frames_per_chunk < 1 or s.video_frames_per_chunk < 1 or s.fps <= 0 or s.passes < 1:
        raise ProfileError(f"{where}: shape {s.name!r} needs positive frames per chunk, fps and passes")
    if s.window_frames < s.latent_frames_per_chunk:
        raise ProfileError(f"{where}: shape.window_frames {s.window_frames} is smaller than one chunk")
    for r in p.rounds:
        if r.batch < 1 or r.context_frames < 0 or r.round_ms <= 0:
            raise ProfileError(f"{where}: round {r} needs batch >= 1, context_frames >= 0, round_ms > 0")
    if p.fixed_ms < 0:
        raise ProfileError(f"{where}: fixed_ms must be >= 0")
    if p.jitter_unit not in JITTER_UNITS:
        raise ProfileError(f"{where}: jitter_unit {p.jitter_unit!r} is not one of {', '.join(JITTER_UNITS)}")
    tables = [("jitter", p.jitter), ("jitter_shared", p.jitter_shared)]
    for key, by_batch in (("jitter_by_batch", p.jitter_by_batch), ("jitter_shared_by_batch", p.jitter_shared_by_batch)):
        for b, q in by_batch.items():
            if b < 1 or not q:
                raise ProfileError(f"{where}: {key} needs batch sizes >= 1, each with quantiles")
            tables.append((f"{key}[{b}]", q))
    if p.jitter_by_batch and not p.jitter:
        raise ProfileError(f"{where}: jitter_by_batch needs jitter (the rounds of the other batch sizes)")
    if p.jitter_shared_by_batch and not p.jitter_shared:
        raise ProfileError(f"{where}: jitter_shared_by_batch needs jitter_shared (the rounds of the other batch sizes)")
    for name, q in tables:
        if q and list(q) != sorted(q):
            raise ProfileError(f"{where}: {name} must be quantiles in ascending order")
        if q and p.jitter_unit == "ratio" and min(q) <= 0:
            raise ProfileError(f"{where}: {name} must be positive ratios (jitter_unit \"ratio\")")
    if p.jitter_shared and not p.jitter:
        raise ProfileError(f"{where}: jitter_shared needs jitter (the rounds begun alone)")


# ---------------------------------------------------------------- shared reference format

ROW_FIELDS = ("batch", "cache_frames", "chunk_tokens", "passes", "chunk_ms", "kv_bytes_per_session", "peak_gib", "params_b")


def shared_to_profiles(
    data: dict,
    where: str,
    window_frames: dict[str, int] | None = None,
    vae: list | None = None,
    copy: dict | None = None,
) -> list[ShapeProfile]:
    """Map the shared format's model tables onto `ShapeProfile`s (see the module docstring).
    `vae` / `copy` sections from another file may be passed where this one has none."""
    vae = data.get("vae", vae)
    copy = data.get("copy", data.get("copy_small", copy))
    out = []
    for model, rows in data.items():
        if model in ("copy", "copy_small", "vae"):
            continue
        if not isinstance(rows, list) or not rows:
            raise ProfileError(f"{where}: model {model!r} must map to a non-empty list of rows")
        for i, r in enumerate(rows):
            for k in ROW_FIELDS:
                _need(r, k, f"{where}: {model}[{i}]")
        out.append(_shared_model(model, rows, where, (window_frames or {}).get(model), vae, copy))
    if not out:
        raise ProfileError(f"{where}: no model tables (expected a top-level model name with rows, or 'format')")
    return out


def _shared_model(model: str, rows: list[dict], where: str, window: int | None, vae, copy) -> ShapeProfile:
    by_cache: dict[int, int] = {}
    for r in rows:
        by_cache[int(r["cache_frames"])] = int(r["kv_bytes_per_session"])
    caches = sorted(by_cache)
    if len(caches) >= 2:
        c0, c1 = caches[0], caches[-1]
        per_frame = (by_cache[c1] - by_cache[c0]) / (c1 - c0)
        latent_per_chunk = max(1, round(by_cache[c0] / per_frame - c0))
    else:
        latent_per_chunk = 1  # one context only: nothing tells frames apart; assume one
        per_frame = by_cache[caches[0]] / (caches[0] + 1)
    tokens_per_frame = int(rows[0]["chunk_tokens"]) // latent_per_chunk
    passes = int(rows[0]["passes"])
    weights = int(float(rows[0]["params_b"]) * 1e9 * 2)
    if window is None:
        window = caches[-1] + latent_per_chunk
    video_per_chunk = VIDEO_FRAMES_PER_LATENT * latent_per_chunk
    shape = ShapeInfo(
        name=model,
        latent_frames_per_chunk=latent_per_chunk,
        video_frames_per_chunk=video_per_chunk,
        fps=16.0,
        window_frames=int(window),
        passes=passes,
        weights_bytes=weights,
        gpu_memory_bytes=H100_MEMORY_BYTES,
    )
    rounds = [RoundPoint(int(r["batch"]), float(r["cache_frames"]), float(r["chunk_ms"])) for r in rows]
    state = sorted({(float(c + latent_per_chunk), b) for c, b in by_cache.items()})
    act: dict[int, int] = {}
    for r in rows:
        b = int(r["batch"])
        transient = float(r["peak_gib"]) * GIB - weights - b * int(r["cache_frames"]) * per_frame
        act[b] = max(act.get(b, 0), int(max(0.0, transient)))
    fixed = 0.0
    if vae:
        fixed = vae_fixed_ms(vae, tokens_per_frame * latent_per_chunk, where)
    transfer = {k: float(copy[k]) for k in TRANSFER_KEYS if copy and k in copy}
    return ShapeProfile(
        shape=shape,
        rounds=rounds,
        fixed_ms=fixed,
        state_bytes=[(c, int(b)) for c, b in state],
        activation_bytes=sorted(act.items()),
        transfer=transfer,
        source=f"{where}: model {model!r} (shared reference format)",
    )


def vae_fixed_ms(vae: list[dict], chunk_tokens: int, where: str = "<vae>") -> float:
    """Median per-session VAE decode time of the measured rows, scaled by video pixels per
    chunk from the measured resolution to one of `chunk_tokens` latent tokens."""
    per_session, measured_pixels = [], None
    for i, r in enumerate(vae):
        w = f"{where}: vae[{i}]"
        per_session.append(float(_need(r, "per_session_ms", w)))
        h, wd = (int(x) for x in str(_need(r, "hw", w)).split("x"))
        measured_pixels = h * wd * VIDEO_FRAMES_PER_LATENT * int(_need(r, "latent_frames", w))
    pixels = chunk_tokens * PIXELS_PER_TOKEN * VIDEO_FRAMES_PER_LATENT
    return statistics.median(per_session) * pixels / measured_pixels
