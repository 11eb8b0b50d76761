"""Named model configs: what `--model tiny|helios-tiny|wan1.3b|wan14b|helios-14b` means.

In: a config name. Out: a frozen `ModelConfig` with the transformer and VAE constructor
arguments (diffusers' own classes take them as keyword arguments), the default resolution,
chunk size, denoising steps, attention window and playback rate.

Units: `width`/`height` in video pixels; `frames_per_chunk` in video frames; everything named
`*_frames` below (window, sink, history) in *latent* frames. The Wan VAE compresses time 4x
and space 8x, and the transformer patches space 2x2, so one latent frame of a W x H video
holds (W/16)*(H/16) tokens and decodes to 4 video frames.

`tiny` was sized by measurement on the 2-core CPU this project is tested on (torch 2.13,
float32): 64x64 video, one latent frame (4 video frames, 16 tokens) per chunk. One chunk at
batch 1 with a full attention window (4 denoising passes + 1 clean pass + VAE decode of one
latent frame) takes 43 ms (min; median 47 ms, one torch thread), of which the VAE is
37 ms: its full-resolution layers dominate. The VAE alone costs 36 ms per latent frame at
64x64, 76 ms at 96x96 and 134 ms at 128x128, so 64x64 is the largest square size that keeps
a chunk well under 150 ms. (`python3 -c` timing of `generate` on copies of a warmed-up
session; with other jobs on the machine, two torch threads oversubscribe and times
become erratic.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

VAE_TIME_FACTOR = 4  # video frames per latent frame (Wan VAE temporal compression)
VAE_SPACE_FACTOR = 8  # video pixels per latent pixel (Wan VAE spatial compression)

# Wan2.1 VAE as published (diffusers' AutoencoderKLWan defaults), and a tiny one that builds.
WAN_VAE: dict[str, Any] = {}
TINY_VAE: dict[str, Any] = {
    "base_dim": 4,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
}

TINY_WAN: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 64,
    "freq_dim": 32,
    "ffn_dim": 128,
    "num_layers": 2,
}
WAN_1_3B: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
}
WAN_14B: dict[str, Any] = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
# Helios = Wan-shaped blocks plus multi-term memory patches; rope_dim must sum to the head dim.
TINY_HELIOS: dict[str, Any] = {**TINY_WAN, "rope_dim": (12, 10, 10)}
HELIOS_14B: dict[str, Any] = {**WAN_14B, "rope_dim": (44, 42, 42)}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str  # "wan-causal" | "helios"
    transformer: dict[str, Any]  # diffusers transformer constructor kwargs
    vae: dict[str, Any]  # AutoencoderKLWan constructor kwargs
    width: int  # default video width, pixels
    height: int  # default video height, pixels
    frames_per_chunk: int  # video frames per chunk (a multiple of 4: one latent frame is 4)
    steps: int = 4  # denoising passes per chunk
    window_frames: int = 21  # wan-causal: most latent frames one chunk attends to, its own included
    sink_frames: int = 0  # wan-causal: first latent frames never evicted from the cache
    fps: float = 16.0
    text_len: int = 512  # prompt tokens (UMT5 pads to 512)
    timestep_shift: float = 5.0  # flow-matching shift of the few-step schedule (Self-Forcing uses 5)
    history_frames: tuple[int, int, int] = (16, 2, 1)  # helios: long, mid, short history latents
    max_side: int = 1280  # largest width/height accepted, pixels
    pretrained: str = ""  # where published weights of this shape live (informational)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_frames_per_chunk(self) -> int:
        return self.frames_per_chunk // VAE_TIME_FACTOR

    @property
    def text_dim(self) -> int:
        return int(self.transformer.get("text_dim", 4096))

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)


CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny", family="wan-causal", transformer=TINY_WAN, vae=TINY_VAE,
        width=64, height=64, frames_per_chunk=4, window_frames=6, sink_frames=1,
        text_len=32, max_side=256,
    ),
    "helios-tiny": ModelConfig(
        name="helios-tiny", family="helios", transformer=TINY_HELIOS, vae=TINY_VAE,
        width=64, height=64, frames_per_chunk=4, history_frames=(8, 2, 1), text_len=32,
        timestep_shift=3.0, max_side=256,
    ),
    "wan1.3b": ModelConfig(
        name="wan1.3b", family="wan-causal", transformer=WAN_1_3B, vae=WAN_VAE,
        width=832, height=480, frames_per_chunk=12, window_frames=21, sink_frames=0,
        pretrained="Wan-AI/Wan2.1-T2V-1.3B-Diffusers (+ a Self-Forcing/CausVid/LongLive transformer file)",
    ),
    "wan14b": ModelConfig(
        name="wan14b", family="wan-causal", transformer=WAN_14B, vae=WAN_VAE,
        width=832, height=480, frames_per_chunk=12, window_frames=21, sink_frames=0,
        pretrained="Wan-AI/Wan2.1-T2V-14B-Diffusers (+ a causal transformer file)",
    ),
    "helios-14b": ModelConfig(
        name="helios-14b", family="helios", transformer=HELIOS_14B, vae=WAN_VAE,
        width=640, height=384, frames_per_chunk=36, history_frames=(16, 2, 1),
        timestep_shift=3.0, pretrained="BestWishYsh/Helios-Distilled (diffusers layout)",
    ),
}


def get_config(name: str) -> ModelConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(sorted(CONFIGS))}") from None
