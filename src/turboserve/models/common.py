"""Pieces both model families share: spec validation, the few-step flow-matching schedule,
per-session random noise, conversion of decoded video to uint8 frames, and `GeneratorBase`,
the set-up and per-round bookkeeping every family's generator does the same way.

In: a `ModelConfig` and a `SessionSpec`; a session's tensors dict (for its RNG state); for
`GeneratorBase`, the family's diffusers transformer and VAE, a text encoder, device, dtype.
Out: a validated spec; sigma schedules; noise drawn from the session's own generator, whose
state is written back into the session's tensors so that offload, migration and rebuild
continue the same random stream exactly; uint8 (T, H, W, 3) frames on the CPU.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..types import SessionSpec
from .base import StreamState
from .configs import VAE_SPACE_FACTOR, VAE_TIME_FACTOR, ModelConfig
from .text import TextEncoder
from .vae import ChunkDecoder

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


def check_prompt(prompt: object) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")


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


class GeneratorBase:
    """What both families' generators do alike: place the transformer and VAE on the device,
    serve and validate specs, change prompts, check that a round's sessions may share it, and
    turn a round's clean latents into each session's frames through its own VAE cache.

    A family sets `family` and `state_probe_key` (a tensor every live session of it holds,
    whose device says where the session's state is), gives `max_latent_frames_per_chunk`,
    and may adapt its transformer in `_prepare_transformer` (before an attention backend is
    chosen, so the backend applies to the processors the family installs)."""

    family: str
    state_probe_key: str

    def __init__(
        self,
        cfg: ModelConfig,
        transformer: Any,
        vae: Any,
        text_encoder: TextEncoder,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        attention_backend: str | None = None,
        batch_vae: bool | None = None,
    ):
        self.cfg = cfg
        self.device, self.dtype = resolve_device(device), dtype
        self.transformer = place_module(transformer, self.device, dtype)
        self.decoder = ChunkDecoder(place_module(vae, self.device, dtype))
        self.text = text_encoder
        # batched VAE decoding saves launches on a GPU; on a CPU it would cost exactness
        self.batch_vae = (self.device.type == "cuda") if batch_vae is None else batch_vae
        self._prepare_transformer()
        if attention_backend:  # validated by diffusers (name, installed kernels)
            self.transformer.set_attention_backend(attention_backend)

    def _prepare_transformer(self) -> None:
        """Adapt `self.transformer` in place for this family (default: nothing)."""

    # -- specs ---------------------------------------------------------------------------
    @property
    def max_latent_frames_per_chunk(self) -> int:
        raise NotImplementedError

    def default_spec(self) -> SessionSpec:
        c = self.cfg
        return SessionSpec(model=c.name, width=c.width, height=c.height, fps=c.fps,
                           frames_per_chunk=c.frames_per_chunk, steps=c.steps, seed=0)

    def validate_spec(self, spec: SessionSpec) -> SessionSpec:
        return validate_spec(self.cfg, spec, max_latent_frames_per_chunk=self.max_latent_frames_per_chunk)

    # -- sessions --------------------------------------------------------------------------
    def set_prompt(self, state: StreamState, prompt: str) -> None:
        check_prompt(prompt)
        state.prompt = prompt

    # -- rounds ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, states: Sequence[StreamState]) -> list[torch.Tensor]:
        """One chunk for each session, in one coalesced round (`_generate_round`)."""
        if not states:
            return []
        self._check_batch(states)
        n = states[0].spec.frames_per_chunk // VAE_TIME_FACTOR  # latent frames per chunk
        return self._generate_round(states, n, latent_shape(self.cfg, states[0].spec, n))

    def _generate_round(self, states: Sequence[StreamState], n: int,
                        shape: tuple[int, int, int, int]) -> list[torch.Tensor]:
        """The family's round over checked, compatible `states`: n latent frames each, of
        per-session latent `shape` (C, n, h, w); returns uint8 frames per session."""
        raise NotImplementedError

    def _check_batch(self, states: Sequence[StreamState]) -> None:
        key = states[0].spec.compat_key
        for s in states:
            if s.spec.compat_key != key:
                raise ValueError(f"session {s.session_id} ({s.spec.compat_key}) cannot share a round with {key}")
            probe = s.tensors.get(self.state_probe_key)
            if probe is None or probe.device != self.device:
                where = None if probe is None else probe.device
                raise ValueError(f"session {s.session_id} state is on {where}, the generator on {self.device}")

    def _decode_round(self, latents: torch.Tensor, states: Sequence[StreamState]) -> list[torch.Tensor]:
        """Decode each session's clean chunk latents (`latents[b]`: C, n, h, w) through its own
        VAE cache and keep the last latent frames the decoder's reach needs in `vae_hist`.
        Returns uint8 (T, H, W, 3) frames per session, a first chunk (`chunk_index` 0)
        padded to `frames_per_chunk`; `chunk_index` is the caller's to advance."""
        if self.batch_vae:
            videos = self.decoder.decode_chunks([latents[b] for b in range(len(states))],
                                                [(s.tensors, s.meta) for s in states])
        else:
            videos = [self.decoder.decode_chunk(latents[b], s.tensors, s.meta) for b, s in enumerate(states)]
        frames_per_chunk = states[0].spec.frames_per_chunk
        outputs = []
        for b, (s, video) in enumerate(zip(states, videos)):
            hist = torch.cat([s.tensors["vae_hist"], latents[b].float()], dim=1)
            s.tensors["vae_hist"] = hist[:, -self.decoder.history_frames :].contiguous()
            frames = video_to_uint8(video)
            outputs.append(pad_first_chunk(frames, frames_per_chunk) if s.chunk_index == 0 else frames)
        return outputs
