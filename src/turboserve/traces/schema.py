"""Session traces as JSONL: one `types.SessionRecord` per line.

In: a path (or lines) of JSON objects `{"id": str, "arrival_s": float (seconds from the
trace start), "spec": {SessionSpec fields}, "periods": [{"active_s": float, "idle_s":
float}, ...], "prompt": str, "meta": {...}}`. Out: `SessionRecord`s sorted as written;
`write_trace` writes them back the same way. Errors name the file, the line and the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Iterator

from ..types import Period, SessionRecord, SessionSpec


class TraceError(ValueError):
    """A trace line that cannot be used; the message names the line and the field."""


def record_to_dict(r: SessionRecord) -> dict:
    d = {
        "id": r.id,
        "arrival_s": round(r.arrival_s, 6),
        "spec": r.spec.to_dict(),
        "periods": [{"active_s": round(p.active_s, 6), "idle_s": round(p.idle_s, 6)} for p in r.periods],
    }
    if r.prompt:
        d["prompt"] = r.prompt
    if r.meta:
        d["meta"] = r.meta
    return d


def _number(d: dict, key: str, where: str, default=None) -> float:
    if key not in d:
        if default is not None:
            return default
        raise TraceError(f"{where}: missing field {key!r}")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise TraceError(f"{where}: field {key!r} must be a finite number >= 0, got {v!r}")
    return float(v)


def record_from_dict(d: dict, where: str = "<record>") -> SessionRecord:
    if not isinstance(d, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if "id" not in d:
        raise TraceError(f"{where}: missing field 'id'")
    arrival = _number(d, "arrival_s", where)
    spec_d = d.get("spec")
    if not isinstance(spec_d, dict):
        raise TraceError(f"{where}: missing or non-object field 'spec'")
    unknown = set(spec_d) - set(SessionSpec.__dataclass_fields__)
    if unknown:
        raise TraceError(f"{where}: spec has unknown fields {sorted(unknown)}; expected {sorted(SessionSpec.__dataclass_fields__)}")
    try:
        spec = SessionSpec.from_dict(spec_d)
    except TypeError as e:
        raise TraceError(f"{where}: bad spec ({e})") from None
    if spec.fps <= 0 or spec.frames_per_chunk < 1 or spec.steps < 0:
        raise TraceError(f"{where}: spec needs fps > 0, frames_per_chunk >= 1 and steps >= 0")
    periods_d = d.get("periods")
    if not isinstance(periods_d, list) or not periods_d:
        raise TraceError(f"{where}: field 'periods' must be a non-empty list of {{active_s, idle_s}}")
    periods = []
    for i, p in enumerate(periods_d):
        w = f"{where}: periods[{i}]"
        if not isinstance(p, dict):
            raise TraceError(f"{w}: expected an object with active_s and idle_s")
        periods.append(Period(_number(p, "active_s", w), _number(p, "idle_s", w, default=0.0)))
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise TraceError(f"{where}: field 'meta' must be an object")
    return SessionRecord(str(d["id"]), arrival, spec, tuple(periods), str(d.get("prompt", "")), meta)


def iter_trace(path: str | Path) -> Iterator[SessionRecord]:
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a trace file (JSONL)" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"trace file {path} {what}")
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not valid JSON ({e.msg})") from None
            yield record_from_dict(d, where)


def read_trace(path: str | Path) -> list[SessionRecord]:
    records = list(iter_trace(path))
    ids = set()
    for r in records:
        if r.id in ids:
            raise TraceError(f"{path}: duplicate session id {r.id!r}")
        ids.add(r.id)
    return records


def write_trace(records: Iterable[SessionRecord], path: str | Path) -> int:
    """Write records sorted by arrival; returns how many."""
    rows = sorted(records, key=lambda r: (r.arrival_s, r.id))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(record_to_dict(r), separators=(",", ":")) + "\n")
    return len(rows)
