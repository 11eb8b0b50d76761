"""turboserve.models: streaming video model families behind the `ChunkGenerator` protocol.

In: a model config name (`tiny`, `helios-tiny`, `wan1.3b`, `wan14b`, `helios-14b`, or a
plugin's), optional weights (a diffusers pipeline folder or an original-layout transformer
file), a device. Out: a `ChunkGenerator` (see `base.py`) via `load_generator`.

Modules: `configs` (named configs), `registry` (names -> generators, entry-point plugins),
`loading` (weights through diffusers), `wan_causal/` and `helios` (the families), `vae`
(chunk-by-chunk causal decoding), `text` (prompt embeddings), `common` (shared sampling
and validation). Importing this package does not import diffusers.
"""

from .base import Checkpoint, ChunkGenerator, StreamState
from .configs import CONFIGS, ModelConfig, get_config
from .registry import load_generator, model_names

__all__ = [
    "CONFIGS", "Checkpoint", "ChunkGenerator", "ModelConfig", "StreamState",
    "get_config", "load_generator", "model_names",
]
