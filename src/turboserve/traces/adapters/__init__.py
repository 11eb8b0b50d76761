"""Adapters from public request traces (Mooncake, Azure, ServeGen) to session traces.

Each module's `convert(paths, shape, frames_per_chunk, seed, ...)` returns `SessionRecord`s;
its docstring documents the mapping.
"""
