"""Built-in model shapes and name resolution.

In: a shape name or a profile file path. Out: the profile files shipped in `shapes/`
(package data, built by `python -m turboserve.profile.build_shapes`) and the shape name
registered in a `ProfileLatencyModel`.
"""

from __future__ import annotations

from pathlib import Path

from .format import load_profiles
from .model import ProfileLatencyModel

SHAPES_DIR = Path(__file__).with_name("shapes")
# Shapes measured on an H100 (see each file's "source"); `tiny` is measured on a CPU.
BUILTIN_SHAPES = ("demo91", "wan1.3b-320p", "wan1.3b-480p", "wan14b-480p")


def builtin_profile_files() -> list[Path]:
    return sorted(SHAPES_DIR.glob("*.json"))


def resolve_shape(name_or_path: str, model: ProfileLatencyModel) -> str:
    """A shape name known to `model`, or a profile file that is loaded and registered.
    Returns the shape name; raises ValueError naming the known shapes otherwise."""
    if model.has_shape(name_or_path):
        return name_or_path
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ValueError(f"profile file {path} does not exist")
        profiles = load_profiles(path)
        for p in profiles:
            model.add_profile(p)
        return profiles[0].name
    raise ValueError(
        f"unknown model shape {name_or_path!r}; known shapes: {', '.join(model.shapes())} "
        "(or a profile .json file)"
    )
