"""Model name -> a ready `ChunkGenerator`.

In: a model config name (`tiny`, `helios-tiny`, `wan1.3b`, `wan14b`, `helios-14b`, or a
name a plugin registers), optional weights, a device and dtype. Out: the generator.

Families are plugins: a package adds an entry point in the group `turboserve.models` whose
name is the model name and whose object is a callable
`(model, *, weights, device, dtype, seed) -> ChunkGenerator`. Built-in names win.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Callable

import torch

from .base import ChunkGenerator
from .configs import CONFIGS, ModelConfig

ENTRY_POINT_GROUP = "turboserve.models"


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def generator_options(engine: Any) -> dict[str, Any]:
    """`load_generator`'s keyword arguments that the config's `engine` section sets: the
    dtype ("auto", the config's check lets only torch names through otherwise: None, so
    `default_dtype`) and the attention backend ("" = the default)."""
    return {"dtype": None if engine.dtype == "auto" else getattr(torch, engine.dtype),
            "attention_backend": engine.attention_backend or None}


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def model_names() -> list[str]:
    return sorted(set(CONFIGS) | set(_plugins()))


def build_family(
    cfg: ModelConfig, *, weights: str | None, device: torch.device, dtype: torch.dtype, seed: int,
    attention_backend: str | None = None,
) -> ChunkGenerator:
    from .common import resolve_device
    from .loading import load_weights
    from .text import TextEncoder

    device = resolve_device(device)
    loaded = load_weights(cfg, weights, seed=seed)
    text_dim = int(loaded.transformer.config.text_dim)
    text = TextEncoder(text_dim, cfg.text_len, device=device, dtype=dtype, weights_dir=loaded.text_dir)
    if cfg.family == "wan-causal":
        from .wan_causal import WanCausalGenerator

        gen: Any = WanCausalGenerator(cfg, loaded.transformer, loaded.vae, text, device=device, dtype=dtype,
                                      attention_backend=attention_backend)
    elif cfg.family == "helios":
        from .helios import HeliosGenerator

        gen = HeliosGenerator(cfg, loaded.transformer, loaded.vae, text, device=device, dtype=dtype,
                              attention_backend=attention_backend)
    else:
        raise ValueError(f"model {cfg.name!r} names unknown family {cfg.family!r}")
    gen.weights_source = loaded.source
    return gen


def load_generator(
    model: str,
    *,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    attention_backend: str | None = None,
) -> ChunkGenerator:
    """The generator for `model`; random weights from `seed` unless `weights` is given."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    dtype = dtype or default_dtype(device)
    if model in CONFIGS:
        return build_family(CONFIGS[model], weights=weights, device=device, dtype=dtype, seed=seed,
                            attention_backend=attention_backend)
    plugin = _plugins().get(model)
    if plugin is None:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(model_names())}")
    factory: Callable[..., ChunkGenerator] = plugin.load()
    return factory(model, weights=weights, device=device, dtype=dtype, seed=seed)
