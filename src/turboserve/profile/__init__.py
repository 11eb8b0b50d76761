"""Latency and memory model from measured profiles, and the built-in model shapes.

In: profile JSON files (the built-in ones in `profile/shapes/`, plus any the user names).
Out: a `ProfileLatencyModel` (the `LatencyModel` of policy/latency.py) and shape names
resolved against it. `turboserve profile` (profile/cli.py) writes new profile files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .format import FORMAT, ProfileError, ShapeProfile, load_profiles, save_profile
from .model import ProfileLatencyModel
from .shapes import BUILTIN_SHAPES, SHAPES_DIR, builtin_profile_files, resolve_shape


def load_latency_model(extra: Iterable[str | Path] = ()) -> ProfileLatencyModel:
    """Every built-in shape, then the profiles in `extra` (a later shape of the same name
    replaces an earlier one)."""
    model = ProfileLatencyModel()
    for path in [*builtin_profile_files(), *extra]:
        for p in load_profiles(path):
            model.add_profile(p)
    return model


__all__ = [
    "BUILTIN_SHAPES",
    "FORMAT",
    "SHAPES_DIR",
    "ProfileError",
    "ProfileLatencyModel",
    "ShapeProfile",
    "load_latency_model",
    "load_profiles",
    "resolve_shape",
    "save_profile",
]
