"""Pieces both model families share: spec validation, the few-step flow-matching schedule,
per-session random noise, and conversion of decoded video to uint8 frames.

In: a `ModelConfig` and a `SessionSpec`; a session's tensors dict (for its RNG state).
Out: a validated spec; sigma schedules; noise drawn from the session's own generator, whose
state is written back into the session's tensors so that offload, migration and rebuild
continue the same random stream exactly; uint8 (T, H, W, 3) frames on the CPU.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..types import SessionSpec
from .configs import VAE_SPACE_FACTOR, VAE_TIME_FACTOR, ModelConfig

RNG_KEY = "rng"  # StreamState.tensors key of the session's CPU generator state (uint8)
MAX_STEPS = 50
PIXEL_MULTIPLE = VAE_SPACE_FACTOR * 2  # VAE 8x, then the transformer's 2x2 patches


def validate_spec(cfg: ModelConfig, spec: SessionSpec, *, max_latent_frames_per_chunk: int) -> SessionSpec:
    """Fill 0-valued fields with the model's defaults and reject what the model cannot serve,
    naming the field and the allowed range."""
    if spec.model != cfg.name:
        raise ValueError(f"spec.model={spec.model!r} but this generator serves {cfg.name!r}")
    width = spec.width or cfg.width
    height = spec.height or cfg.height
    for field_name, value in (("width", width), ("height", height)):
        if value % PIXEL_MULTIPLE or not PIXEL_MULTIPLE <= value <= cfg.max_side:
            raise ValueError(
                f"spec.{field_name}={value} is not served by {cfg.name!r}: use a multiple of "
                f"{PIXEL_MULTIPLE} in [{PIXEL_MULTIPLE}, {cfg.max_side}] (0 = {getattr(cfg, field_name)})"
            )
    frames = spec.frames_per_chunk or cfg.frames_per_chunk
    max_frames = max_latent_frames_per_chunk * VAE_TIME_FACTOR
    if frames % VAE_TIME_FACTOR or not VAE_TIME_FACTOR <= frames <= max_frames:
        raise ValueError(
            f"spec.frames_per_chunk={frames} is not served by {cfg.name!r}: use a multiple of "
            f"{VAE_TIME_FACTOR} in [{VAE_TIME_FACTOR}, {max_frames}] (0 = {cfg.frames_per_chunk})"
        )
    steps = spec.steps or cfg.steps
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"spec.steps={steps} must be in [1, {MAX_STEPS}] (0 = {cfg.steps})")
    fps = spec.fps or cfg.fps
    if not fps > 0:
        raise ValueError(f"spec.fps={spec.fps} must be > 0 (0 = {cfg.fps})")
    if not 0 <= spec.seed < 2**63:
        raise ValueError(f"spec.seed={spec.seed} must be in [0, 2**63)")
    return spec.with_(width=width, height=height, frames_per_chunk=frames, steps=steps, fps=fps)


def few_step_sigmas(steps: int, shift: float) -> list[float]:
    """Noise levels (1 = pure noise) of a few-step flow-matching schedule: uniform in
    [1, 0) then shifted, sigma' = shift*s / (1 + (shift-1)*s), as Self-Forcing's warped
    denoising steps (4 steps, shift 5: t = 1000, 937.5, 833.3, 625)."""
    out = []
    for i in range(steps):
        s = 1.0 - i / steps
        out.append(shift * s / (1.0 + (shift - 1.0) * s))
    return out


def new_rng_state(seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen.get_state()


def draw_noise(tensors: dict[str, torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal float32 noise from the session's own generator, on the CPU (so the
    stream is the same whichever device runs the session); advances the stored state."""
    gen = torch.Generator(device="cpu")
    gen.set_state(tensors[RNG_KEY].cpu())
    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    state = gen.get_state()
    device = tensors[RNG_KEY].device
    tensors[RNG_KEY] = state if device.type == "cpu" else state.to(device)
    return noise


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] on any device -> uint8 (T, H, W, 3) on the CPU."""
    pixels = ((video.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().cpu()


def latent_shape(cfg: ModelConfig, spec: SessionSpec, frames: int) -> tuple[int, int, int, int]:
    channels = int(cfg.transformer.get("in_channels", 16))
    return (channels, frames, spec.height // VAE_SPACE_FACTOR, spec.width // VAE_SPACE_FACTOR)


def pad_first_chunk(frames: torch.Tensor, wanted: int) -> torch.Tensor:
    """The causal VAE turns a session's first latent frame into ONE video frame (later ones
    into 4), so the first chunk is 3 frames short; repeating its first frame keeps every
    chunk exactly `frames_per_chunk` long, which playback and SLO accounting assume."""
    missing = wanted - frames.shape[0]
    if missing <= 0:
        return frames
    return torch.cat([frames[:1].expand(missing, *frames.shape[1:]), frames], dim=0)


def resolve_device(device: torch.device | str) -> torch.device:
    """`cuda` -> `cuda:<current>` so device comparisons with tensors' devices hold."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def place_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a diffusers model to device/dtype, keeping the submodules it declares float32-only
    (`_keep_in_fp32_modules`: norms, time embedder, modulation tables) in float32 as
    `from_pretrained(torch_dtype=...)` would."""
    torch.nn.Module.to(module, device=device, dtype=dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype != torch.float32 and keep:
        for name, sub in module.named_modules():
            if any(part in keep for part in name.split(".")):
                torch.nn.Module.to(sub, dtype=torch.float32)
        for name, param in module.named_parameters():
            if any(part in keep for part in name.split(".")):
                param.data = param.data.float()
    return module.eval()
