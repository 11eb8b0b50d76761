"""Adapters from public request traces (Mooncake, Azure, ServeGen) to session traces.

Each module's `convert(paths, shape, frames_per_chunk, seed, ...)` returns `SessionRecord`s;
its docstring documents the mapping.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable


def input_files(paths: Iterable[str | Path], pattern: str, what: str) -> list[Path]:
    """The files named, a directory standing for its files matching `pattern` (in natural
    order: part-2 before part-10). A missing path, or a directory with no such file, is a
    `FileNotFoundError` naming it and `what` was looked for."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted((f for f in p.glob(pattern) if f.is_file()),
                           key=lambda f: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", f.name)])
            if not found:
                raise FileNotFoundError(f"{p}: a directory with no {what} ({pattern}) in it")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{what} {p} does not exist")
    return files
