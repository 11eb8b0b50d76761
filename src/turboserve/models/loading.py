"""Weights through diffusers: random from a seed, a diffusers pipeline folder, or one
original-layout transformer file (the form Self-Forcing, CausVid and LongLive publish).

In: a `ModelConfig` (family and defaults) and `weights` (None, a folder or a file).
Out: `LoadedWeights` = the transformer and VAE modules (on the CPU, float32) and, when the
folder has them, the text encoder's folder.

- None: the config's architecture, parameters drawn from `seed` (same seed, same model).
- A folder as `save_pretrained` writes it: `transformer/` (required), `vae/` (else a random
  VAE of the config's shape), `text_encoder/` + `tokenizer/` (else the hash text encoder).
  The architecture is the folder's `config.json`, whatever the config name says.
- A `.safetensors` / `.pt` / `.pth` file: diffusers' `from_single_file` converts the
  original key layout; offline it needs a config folder, which we write from the file's own
  tensor shapes (width, depth, FFN and text widths, patch) with the head size taken from the
  named config. `.pt` training checkpoints are unwrapped first (`generator_ema`, `generator`,
  `state_dict`, `model` entries; `model.`, `model.diffusion_model.`, FSDP/DDP key prefixes). If the
  file's folder is a pipeline folder, its `vae/` and text encoder are used too.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .configs import ModelConfig

SINGLE_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class LoadedWeights:
    transformer: Any
    vae: Any
    text_dir: Path | None  # folder holding text_encoder/ and tokenizer/, if any
    source: str  # "random(seed=...)", the folder or the file


def transformer_class(family: str):
    if family == "wan-causal":
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel
    if family == "helios":
        from diffusers import HeliosTransformer3DModel

        return HeliosTransformer3DModel
    raise ValueError(f"no diffusers transformer for family {family!r}")


def random_modules(cfg: ModelConfig, seed: int) -> tuple[Any, Any]:
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = transformer_class(cfg.family)(**cfg.transformer)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**cfg.vae)
    return transformer.eval(), vae.eval()


def load_weights(cfg: ModelConfig, weights: str | Path | None, *, seed: int = 0) -> LoadedWeights:
    if weights is None or str(weights) == "":
        transformer, vae = random_modules(cfg, seed)
        return LoadedWeights(transformer, vae, None, f"random(seed={seed})")
    path = Path(weights)
    if path.is_dir():
        return _load_folder(cfg, path, seed)
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ValueError(f"weights file {path} must end in one of {', '.join(SINGLE_FILE_SUFFIXES)}")
        return _load_single_file(cfg, path, seed)
    raise ValueError(f"weights {str(path)!r} is neither a diffusers pipeline folder nor a checkpoint file")


def _folder_vae_and_text(cfg: ModelConfig, folder: Path, seed: int) -> tuple[Any, Path | None]:
    from diffusers import AutoencoderKLWan

    if (folder / "vae" / "config.json").is_file():
        vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", local_files_only=True)
    else:
        vae = random_modules_vae(cfg, seed)
    has_text = (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir()
    return vae.eval(), (folder if has_text else None)


def random_modules_vae(cfg: ModelConfig, seed: int) -> Any:
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return AutoencoderKLWan(**cfg.vae).eval()


def _load_folder(cfg: ModelConfig, folder: Path, seed: int) -> LoadedWeights:
    if not (folder / "transformer" / "config.json").is_file():
        raise ValueError(f"{folder} is not a diffusers pipeline folder: {folder / 'transformer' / 'config.json'} is missing")
    cls = transformer_class(cfg.family)
    declared = json.loads((folder / "transformer" / "config.json").read_text()).get("_class_name")
    if declared and declared != cls.__name__:
        raise ValueError(f"{folder}/transformer holds a {declared}, model {cfg.name!r} needs a {cls.__name__}")
    transformer = cls.from_pretrained(folder, subfolder="transformer", local_files_only=True)
    vae, text_dir = _folder_vae_and_text(cfg, folder, seed)
    return LoadedWeights(transformer.eval(), vae, text_dir, str(folder))


# -- original-layout single files ---------------------------------------------------------
# Training wrappers' key prefixes (Lightning-style, FSDP, DDP); original Wan keys start
# with none of them, so they are stripped repeatedly.
_PREFIXES = ("model.diffusion_model.", "_fsdp_wrapped_module.", "module.", "generator.", "model.")


def read_original_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of an original-layout checkpoint, unwrapped and with training prefixes cut."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("generator_ema", "generator", "state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a transformer state dict")
    out = {}
    for key, value in sd.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
                    break
        out[key] = value
    if "patch_embedding.weight" not in out or "head.head.weight" not in out:
        raise ValueError(f"{path} is not an original-layout Wan transformer (no patch_embedding/head.head weights)")
    return out


def infer_wan_config(sd: dict[str, torch.Tensor], defaults: dict[str, Any]) -> dict[str, Any]:
    """WanTransformer3DModel config from original-layout tensor shapes."""
    patch = sd["patch_embedding.weight"]
    dim, in_channels = int(patch.shape[0]), int(patch.shape[1])
    patch_size = tuple(int(p) for p in patch.shape[2:])
    head_dim = int(defaults.get("attention_head_dim", 128))
    if dim % head_dim:
        raise ValueError(f"checkpoint width {dim} is not a multiple of the head size {head_dim}")
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    out_channels = int(sd["head.head.weight"].shape[0]) // (patch_size[0] * patch_size[1] * patch_size[2])
    config = dict(defaults)
    config.update(
        patch_size=patch_size, num_attention_heads=dim // head_dim, attention_head_dim=head_dim,
        in_channels=in_channels, out_channels=out_channels,
        text_dim=int(sd["text_embedding.0.weight"].shape[1]), freq_dim=int(sd["time_embedding.0.weight"].shape[1]),
        ffn_dim=int(sd["blocks.0.ffn.0.weight"].shape[0]), num_layers=layers,
        cross_attn_norm="blocks.0.norm3.weight" in sd,
    )
    if "blocks.0.cross_attn.k_img.weight" in sd:
        raise ValueError("image-conditioned (I2V) Wan checkpoints are not supported by wan-causal")
    return config


def _load_single_file(cfg: ModelConfig, path: Path, seed: int) -> LoadedWeights:
    if cfg.family != "wan-causal":
        raise ValueError(f"family {cfg.family!r} loads only from a diffusers folder (diffusers has no single-file converter for it)")
    from diffusers import WanTransformer3DModel

    sd = read_original_state_dict(path)
    config = infer_wan_config(sd, cfg.transformer)
    with tempfile.TemporaryDirectory(prefix="turboserve-config-") as tmp:
        sub = Path(tmp) / "transformer"
        sub.mkdir()
        serialisable = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
        (sub / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **serialisable}))
        source = path
        if path.suffix != ".safetensors" or _needs_rewrite(path):
            from safetensors.torch import save_file

            source = Path(tmp) / "transformer.safetensors"
            save_file({k: v.contiguous() for k, v in sd.items()}, str(source))
        transformer = WanTransformer3DModel.from_single_file(
            str(source), config=tmp, subfolder="transformer", local_files_only=True, torch_dtype=torch.float32
        )
    vae, text_dir = _folder_vae_and_text(cfg, path.parent, seed)
    return LoadedWeights(transformer.eval(), vae, text_dir, str(path))


def _needs_rewrite(path: Path) -> bool:
    """diffusers' converter strips `model.diffusion_model.` itself but not other training prefixes."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    return not any(k in ("head.modulation", "model.diffusion_model.head.modulation") for k in keys)
