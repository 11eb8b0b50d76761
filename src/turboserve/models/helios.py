"""The `helios` family: diffusers' `HeliosTransformer3DModel`, chunk-autoregressive over a
multi-scale latent history.

In: sessions' `StreamState`s of one compatibility group. Out: each session's next chunk as
uint8 frames (T, H, W, 3) on the CPU; each state advanced in place.

Unlike `wan-causal` there is no KV cache: every pass feeds the model the chunk's noisy
latents *and* the session's recent clean latents at three scales, as its forward takes them
(`latents_history_long/mid/short`, patched 4x8x8, 2x4x4 and 1x2x2, with explicit frame
indices), so per-chunk compute includes the history tokens and the model's state is only
the history itself (megabytes); the VAE decoder's causal cache, which both families keep
per session, comes on top (see `vae.py`: ~1.2 GB in bf16 at 384x640). As in diffusers' Helios pipeline (`keep_first_frame`), the short
history is prefixed with the session's first generated latent frame, the history starts as
zeros, and the frame indices are positions inside that fixed window (the same every chunk).
Because the window has a fixed size, every session of a round has the same token count and
the round is one plain batched `forward` call.

Sampling: `steps` Euler steps of the flow over the shifted few-step sigma schedule
(`common.few_step_sigmas`), starting from noise drawn from the session's own RNG.

Session state (`StreamState.tensors`): `history` (C, long+mid+short, h, w) float32,
`prefix` (C, 1, h, w) float32, `rng`, `vae_hist` + `vae.{i}` (the VAE decoder's cache, see
`vae.py`). Checkpoint = everything but the VAE cache, which rebuild recomputes exactly from
`vae_hist`; so rebuild is exact.

Coalescing is exact: diffusers' forward runs the patch convolutions and the timestep MLP
over the whole batch, and the CPU kernels for those block differently by batch size (a
coalesced session's latents then differed from its solo ones by ~5e-7, frames by 1 of 255).
`_make_batch_invariant` makes those few cheap modules compute per session / once per round
on this model instance, so a coalesced session's frames equal its solo frames bit for bit;
the heavy linears, norms and attention stay batched (they are batch-invariant here).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..types import SessionSpec
from .base import Checkpoint, StreamState
from .common import (
    RNG_KEY, GeneratorBase, check_prompt, draw_noise, few_step_sigmas, latent_shape, new_rng_state,
)
from .configs import ModelConfig
from .vae import FRAMES_META

MAX_LATENT_FRAMES_PER_CHUNK = 16


class HeliosGenerator(GeneratorBase):
    family = "helios"
    state_probe_key = "history"

    def __init__(self, cfg: ModelConfig, *args: Any, **kwargs: Any):
        super().__init__(cfg, *args, **kwargs)
        long_, mid, short = cfg.history_frames
        if min(long_, mid, short) < 1:
            raise ValueError(f"helios history_frames {cfg.history_frames} must all be >= 1")
        self.history_sizes = (long_, mid, short)

    def _prepare_transformer(self) -> None:
        _make_batch_invariant(self.transformer)

    @property
    def max_latent_frames_per_chunk(self) -> int:
        return max(self.cfg.latent_frames_per_chunk, MAX_LATENT_FRAMES_PER_CHUNK)

    # -- sessions --------------------------------------------------------------------------
    def start_session(self, session_id: str, spec: SessionSpec, prompt: str) -> StreamState:
        spec = self.validate_spec(spec)
        check_prompt(prompt)
        state = StreamState(session_id=session_id, spec=spec, prompt=prompt)
        c, _, h, w = latent_shape(self.cfg, spec, 0)
        z = dict(device=self.device, dtype=torch.float32)
        state.tensors["history"] = torch.zeros(c, sum(self.history_sizes), h, w, **z)
        state.tensors["prefix"] = torch.zeros(c, 1, h, w, **z)
        state.tensors["vae_hist"] = torch.empty(c, 0, h, w, **z)
        state.tensors[RNG_KEY] = new_rng_state(spec.seed).to(self.device)
        state.meta["next_frame"] = 0
        self.decoder.init_state(state.tensors, state.meta)
        return state

    # set_prompt (GeneratorBase): embeddings come from the text encoder's cache at the next chunk

    # -- generation ------------------------------------------------------------------------
    def _indices(self, n: int) -> dict[str, torch.Tensor]:
        long_, mid, short = self.history_sizes
        idx = torch.arange(0, 1 + long_ + mid + short + n, device=self.device)
        prefix, i_long, i_mid, i_short, i_chunk = idx.split([1, long_, mid, short, n])
        return {
            "indices_hidden_states": i_chunk.unsqueeze(0),
            "indices_latents_history_short": torch.cat([prefix, i_short]).unsqueeze(0),
            "indices_latents_history_mid": i_mid.unsqueeze(0),
            "indices_latents_history_long": i_long.unsqueeze(0),
        }

    @torch.no_grad()
    def _flow(self, x: torch.Tensor, sigma: float, history: dict[str, torch.Tensor],
              text: torch.Tensor, indices: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = x.shape[0]
        t = torch.full((batch,), sigma * 1000.0, device=self.device)
        out = self.transformer(
            hidden_states=x.to(self.dtype), timestep=t, encoder_hidden_states=text,
            **indices, **history, return_dict=False,
        )[0]
        return out.float()

    @torch.no_grad()
    def _generate_round(self, states: Sequence[StreamState], n: int,
                        shape: tuple[int, int, int, int]) -> list[torch.Tensor]:
        spec = states[0].spec
        long_, mid, short = self.history_sizes
        hist = torch.stack([s.tensors["history"] for s in states])
        h_long, h_mid, h_short = hist.split([long_, mid, short], dim=2)
        prefix = torch.stack([s.tensors["prefix"] for s in states])
        history = {
            "latents_history_long": h_long.to(self.dtype),
            "latents_history_mid": h_mid.to(self.dtype),
            "latents_history_short": torch.cat([prefix, h_short], dim=2).to(self.dtype),
        }
        text = torch.stack([self.text.encode(s.prompt) for s in states]).to(self.device, self.dtype)
        indices = self._indices(n)

        x = torch.stack([draw_noise(s.tensors, shape) for s in states]).to(self.device)
        sigmas = few_step_sigmas(spec.steps, self.cfg.timestep_shift) + [0.0]
        for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
            x = x + (nxt - sigma) * self._flow(x, sigma, history, text, indices)

        outputs = self._decode_round(x, states)
        for b, s in enumerate(states):
            x0 = x[b]
            if s.chunk_index == 0:
                s.tensors["prefix"] = x0[:, :1].clone()
            s.tensors["history"] = torch.cat([s.tensors["history"], x0], dim=1)[:, -sum(self.history_sizes):].contiguous()
            s.meta["next_frame"] += n
            s.chunk_index += 1
        return outputs

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self, state: StreamState) -> Checkpoint:
        keys = ("history", "prefix", "vae_hist", RNG_KEY)
        return Checkpoint(
            session_id=state.session_id, spec=state.spec, prompt=state.prompt, chunk_index=state.chunk_index,
            tensors={k: state.tensors[k].detach().cpu().clone() for k in keys},
            meta={"next_frame": state.meta["next_frame"], FRAMES_META: state.meta[FRAMES_META]},
        )

    @torch.no_grad()
    def rebuild(self, ckpt: Checkpoint) -> StreamState:
        state = self.start_session(ckpt.session_id, ckpt.spec, ckpt.prompt)
        state.chunk_index = ckpt.chunk_index
        for key in ("history", "prefix", "vae_hist", RNG_KEY):
            state.tensors[key] = ckpt.tensors[key].to(self.device).clone()
        state.meta["next_frame"] = ckpt.meta["next_frame"]
        hist = state.tensors["vae_hist"]
        if hist.shape[1]:
            self.decoder.decode_chunk(hist, state.tensors, state.meta)  # exact: spans the reach
        state.meta[FRAMES_META] = ckpt.meta[FRAMES_META]
        return state


def _make_batch_invariant(transformer: Any) -> None:
    """Per-instance wrappers (weights and state-dict keys untouched): the patch embeddings
    run one session at a time, and the time embedding, identical for every session of a
    round, is computed once at batch 1 and broadcast."""
    import types

    def per_sample(conv, x):
        return torch.cat([type(conv).forward(conv, x[b : b + 1]) for b in range(x.shape[0])])

    for name in ("patch_embedding", "patch_short", "patch_mid", "patch_long"):
        conv = getattr(transformer, name, None)
        if conv is not None:
            conv.forward = types.MethodType(per_sample, conv)

    embedder = transformer.condition_embedder
    original = type(embedder).forward

    def once_per_round(self, timestep, encoder_hidden_states=None, is_return_encoder_hidden_states=True):
        if timestep.ndim == 1 and timestep.shape[0] > 1 and bool((timestep == timestep[0]).all()):
            temb, proj, _ = original(self, timestep[:1], encoder_hidden_states, False)
            batch = timestep.shape[0]
            temb, proj = temb.expand(batch, -1), proj.expand(batch, -1)
            text = encoder_hidden_states
            if encoder_hidden_states is not None and is_return_encoder_hidden_states:
                text = self.text_embedder(encoder_hidden_states)
            return temb, proj, text
        return original(self, timestep, encoder_hidden_states, is_return_encoder_hidden_states)

    embedder.forward = types.MethodType(once_per_round, embedder)
